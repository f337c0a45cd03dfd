"""Structural checks that keep a kernel a kernel.

Run under the harness's dispatch mode, which sees every aten op and
allocation inside fastmlm's custom ops: the fused paths must never build the
dense intermediate they exist to avoid.
"""
import pytest
import torch

from fastmlm.ops import BackendUnavailable, attention, mlm_cross_entropy, use_backend
from tests.ops.harness import KernelWatch

aten = torch.ops.aten
DENSE_MATH = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.matmul.default,
              aten._softmax.default, aten._log_softmax.default, aten.exp.default, aten.logsumexp.default}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run_watched(backend, family, fn):
    watch = KernelWatch(poison=False)
    try:
        with use_backend(backend, family), watch:
            fn()
    except BackendUnavailable as exc:
        pytest.skip(str(exc).splitlines()[0])
    return watch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cross_entropy_never_allocates_full_logits(backend, device):
    # (The `cpu` backend may hold all logits of a small batch in one chunk to
    # multiply them out once; its bound is the memory test's 25% at M=2000.)
    # More rows than hidden units, so the logits outweigh every legitimate
    # buffer (the weight and its gradient are vocab x hidden).
    rows, hidden_size = (64, 16) if device == "cpu" else (512, 256)
    vocab = 97 if backend == "triton" and device == "cpu" else 30522
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden_size, generator=g).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) * 0.05).to(device).requires_grad_()
    b = torch.zeros(vocab, device=device, requires_grad=True)
    t = torch.randint(0, vocab, (rows,), generator=g).to(device)

    def step():
        mlm_cross_entropy(h, w, t, b, label_smoothing=0.1).backward()

    watch = _run_watched(backend, "mlm_cross_entropy", step)
    # Two bytes per logit: the smallest the dense logits could be stored in.
    dense = [shape for shape, dtype in watch.allocations
             if torch.Size(shape).numel() * dtype.itemsize >= 2 * rows * vocab]
    assert not dense, f"{backend} allocated tensors as large as the logits: {dense}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_triton_attention_uses_no_dense_math(device, causal):
    lengths = [24, 9, 30]
    heads, dim = 1, 8
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, heads, dim, device=device, requires_grad=True) for _ in range(3))

    def step():
        attention(q, k, v, cu, max(lengths), causal=causal).sum().backward()

    watch = _run_watched("triton", "attention", step)
    used = DENSE_MATH.intersection(watch.ops)
    assert not used, f"triton attention called dense aten math: {used}"
    square = len(lengths) * max(lengths) ** 2  # the padded score matrix of one head
    big = [shape for shape, _ in watch.allocations if torch.Size(shape).numel() >= square]
    assert not big, f"triton attention allocated a [seq, seq]-sized tensor: {big}"
