"""Ops on tensors of a GPU that is not the current one.

Triton launches on the current device and fastmlm._C takes the device as an
argument: tensors on cuda:1 while cuda:0 is current must still be computed on
cuda:1, give the reference's result, and leave cuda:0 current. Needs two GPUs.
"""
import pytest
import torch

from fastmlm.ops import attention, gather_rows, masked_positions, mlm_cross_entropy, mlm_head, use_backend

if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

SECOND = torch.device("cuda", 1)


def _on_both(run):
    """run() under the default backends and under `torch`, with cuda:0 current; the results."""
    torch.cuda.set_device(0)
    fast = run()
    assert torch.cuda.current_device() == 0
    with use_backend("torch"):
        reference = run()
    return fast, reference


def test_gather_and_positions():
    x = torch.randn(64, 48, device=SECOND)
    labels = torch.full((4, 16), -100, device=SECOND)
    labels[:, ::3] = 7
    (fast_rows, (fast_index, fast_count)), (ref_rows, (ref_index, ref_count)) = _on_both(
        lambda: (gather_rows(x, torch.tensor([5, 0, 63], device=SECOND)), masked_positions(labels, capacity=32)))
    torch.testing.assert_close(fast_rows, ref_rows)
    assert torch.equal(fast_index, ref_index) and torch.equal(fast_count, ref_count)


def test_cross_entropy_and_head():
    hidden_all = torch.randn(128, 64, device=SECOND, dtype=torch.bfloat16)
    index = torch.randperm(128, device=SECOND)[:40]
    dense_w = torch.randn(64, 64, device=SECOND, dtype=torch.bfloat16) * 0.1
    vectors = [torch.randn(64, device=SECOND, dtype=torch.bfloat16) for _ in range(3)]
    decoder_w = torch.randn(1000, 64, device=SECOND, dtype=torch.bfloat16) * 0.1
    targets = torch.randint(0, 1000, (40,), device=SECOND)
    (ce, head), (ce_ref, head_ref) = _on_both(lambda: (
        mlm_cross_entropy(hidden_all[index], decoder_w, targets),
        mlm_head(hidden_all, index, dense_w, *vectors, decoder_w, None, targets)))
    torch.testing.assert_close(ce, ce_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(head, head_ref, rtol=2e-2, atol=2e-2)


def test_attention():
    q, k, v = (torch.randn(300, 4, 64, device=SECOND, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=SECOND)
    fast, reference = _on_both(lambda: attention(q, k, v, cu, 200, causal=True))
    torch.testing.assert_close(fast, reference, rtol=2e-2, atol=2e-2)
