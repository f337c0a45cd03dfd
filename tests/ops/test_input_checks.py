"""Bad input raises a clear Python error before any kernel is launched."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmlm.ops import attention, gather_rows, mask_tokens, masked_positions, mlm_cross_entropy, no_value_checks
from tests.host_reads import HostReads


class NoCustomOpCalled(TorchDispatchMode):
    """Fails the test if any fastmlm custom op (hence any kernel) is reached."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert not func._schema.name.startswith("fastmlm::"), f"{func} ran before the input was rejected"
        return func(*args, **(kwargs or {}))


def rejects(exc, match, fn, *args, **kwargs):
    with NoCustomOpCalled(), pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def _qkv(total=6, heads=2, dim=8, dtype=torch.float32):
    return [torch.randn(total, heads, dim, dtype=dtype) for _ in range(3)]


def test_gather_rows_checks():
    x = torch.randn(5, 4)
    rejects(IndexError, "outside \\[0, 5\\)", gather_rows, x, torch.tensor([0, 5]))
    rejects(IndexError, "-1", gather_rows, x, torch.tensor([-1]))
    rejects(TypeError, "index must have dtype", gather_rows, x, torch.tensor([0.0]))
    rejects(ValueError, "2 dimensions", gather_rows, torch.randn(5), torch.tensor([0]))
    rejects(TypeError, "x must have dtype", gather_rows, torch.ones(5, 4, dtype=torch.int64), torch.tensor([0]))


def test_cross_entropy_checks():
    h, w, b = torch.randn(3, 8), torch.randn(10, 8), torch.randn(10)
    t = torch.tensor([1, 2, -100])
    rejects(IndexError, "targets contains 10", mlm_cross_entropy, h, w, torch.tensor([1, 10, -100]), b)
    rejects(IndexError, "targets contains -5", mlm_cross_entropy, h, w, torch.tensor([1, -5, -100]), b)
    rejects(ValueError, "expected \\[V, 8\\]", mlm_cross_entropy, h, torch.randn(10, 7), t, b)
    rejects(ValueError, "targets has 2 entries", mlm_cross_entropy, h, w, t[:2], b)
    rejects(ValueError, "bias has 9", mlm_cross_entropy, h, w, t, torch.randn(9))
    rejects(TypeError, "share a dtype", mlm_cross_entropy, h, w.half(), t, b)
    rejects(TypeError, "targets must have dtype int64", mlm_cross_entropy, h, w, t.int(), b)
    rejects(ValueError, "reduction", mlm_cross_entropy, h, w, t, b, reduction="avg")
    rejects(ValueError, "label_smoothing", mlm_cross_entropy, h, w, t, b, label_smoothing=1.5)
    rejects(ValueError, "z_loss", mlm_cross_entropy, h, w, t, b, z_loss=float("nan"))
    rejects(ValueError, "z_loss", mlm_cross_entropy, h, w, t, b, z_loss=-1e-3)
    # 1.5 would zero rows with target 1 in the kernels yet count them in the mean.
    rejects(TypeError, "ignore_index must be an int", mlm_cross_entropy, h, w, t, b, ignore_index=1.5)
    rejects(ValueError, "fit in int64", mlm_cross_entropy, h, w, t, b, ignore_index=2**63)


def test_mlm_head_checks():
    from fastmlm.ops import mlm_head

    hidden_all, index, targets = torch.randn(5, 8), torch.tensor([0, 3]), torch.tensor([1, -100])
    params = [torch.randn(8, 8), torch.randn(8), torch.ones(8), torch.zeros(8), torch.randn(10, 8), torch.zeros(10)]
    rejects(IndexError, "outside \\[0, 5\\)", mlm_head, hidden_all, torch.tensor([0, 5]), *params, targets)
    rejects(IndexError, "targets contains 10", mlm_head, hidden_all, index, *params, torch.tensor([10, 1]))
    rejects(TypeError, "ignore_index must be an int", mlm_head, hidden_all, index, *params, targets,
            ignore_index=-100.0)
    rejects(ValueError, "z_loss", mlm_head, hidden_all, index, *params, targets, z_loss=float("inf"))
    rejects(ValueError, "decoder_weight has shape", mlm_head, hidden_all, index, *params[:4], torch.randn(10, 7),
            params[5], targets)
    rejects(ValueError, "no features", mlm_head, torch.randn(5, 0), index, *[p[..., :0] for p in params[:4]],
            torch.randn(10, 0), params[5], targets)
    rejects(ValueError, "dense_weight has shape \\(8, 7\\)", mlm_head, hidden_all, index, torch.randn(8, 7),
            *params[1:], targets)
    rejects(ValueError, "norm_bias has shape", mlm_head, hidden_all, index, *params[:3], torch.zeros(9), *params[4:],
            targets)
    rejects(ValueError, "vocabulary is empty", mlm_head, hidden_all, index, *params[:4], torch.randn(0, 8),
            torch.zeros(0), targets)
    rejects(ValueError, "decoder_bias has 9 entries", mlm_head, hidden_all, index, *params[:5], torch.zeros(9),
            targets)
    rejects(TypeError, "decoder_weight has dtype torch.float64", mlm_head, hidden_all, index, *params[:4],
            params[4].double(), params[5], targets)
    rejects(ValueError, "targets has 3 entries but index selects 2", mlm_head, hidden_all, index, *params,
            torch.tensor([1, 2, 3]))


def test_attention_checks():
    q, k, v = _qkv()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    rejects(ValueError, "end at the total", attention, q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32), 4)
    rejects(ValueError, "non-decreasing", attention, q, k, v, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4)
    rejects(ValueError, "more than max_seqlen=3", attention, q, k, v, cu, 3)
    rejects(TypeError, "cu_seqlens must have dtype int32", attention, q, k, v, cu.long(), 4)
    rejects(TypeError, "share a dtype", attention, q, k.half(), v, cu, 4)
    rejects(ValueError, "shapes do not fit", attention, q, k[:, :1], v, cu, 4)
    rejects(ValueError, "pass cu_seqlens_k", attention, q, k[:5], v[:5], cu, 4)
    rejects(ValueError, "dropout_p", attention, q, k, v, cu, 4, dropout_p=1.0)
    rejects(ValueError, "softmax_scale must be finite", attention, q, k, v, cu, 4, softmax_scale=float("nan"))
    rejects(ValueError, "softmax_scale must be finite", attention, q, k, v, cu, 4, softmax_scale=1e39)


def test_masking_checks():
    ids = torch.randint(0, 100, (2, 8))
    rejects(IndexError, "outside the vocabulary", mask_tokens, ids + 100, mask_token_id=1, vocab_size=100)
    rejects(ValueError, "mask_token_id", mask_tokens, ids, mask_token_id=100, vocab_size=100)
    rejects(ValueError, "budget", mask_tokens, ids, mask_token_id=1, vocab_size=100, budget="fixed")
    rejects(ValueError, "attention_mask has shape", mask_tokens, ids, mask_token_id=1, vocab_size=100,
            attention_mask=torch.ones(2, 7, dtype=torch.int64))
    rejects(TypeError, "bool or integer", mask_tokens, ids, mask_token_id=1, vocab_size=100,
            attention_mask=torch.ones(2, 8))
    rejects(TypeError, "input_ids must have dtype", mask_tokens, ids.float(), mask_token_id=1, vocab_size=100)
    rejects(ValueError, "capacity", masked_positions, ids, capacity=-1)
    rejects(ValueError, "capacity", masked_positions, ids, capacity=True)
    # Truncating 3.7 to 3 (or taking True as 1) would silently change the draw.
    rejects(TypeError, "seed must be an int", mask_tokens, ids, mask_token_id=1, vocab_size=100, seed=3.7)
    rejects(TypeError, "seed must be an int", mask_tokens, ids, mask_token_id=1, vocab_size=100, seed=True)
    rejects(TypeError, "vocab_size must be an int", mask_tokens, ids, mask_token_id=1, vocab_size=100.5)
    rejects(TypeError, "ignore_index must be an int", masked_positions, ids, ignore_index=-100.0)


def test_masked_positions_compares_labels_in_int64():
    # An ignore_index outside int32 must not wrap onto int32 labels (2**32 - 100 is not -100).
    from fastmlm.ops import use_backend

    labels = torch.tensor([-100, 0, 5, -100], dtype=torch.int32)
    for backend in ("cpu", "torch"):
        with use_backend(backend, "masked_positions"):
            index, count = masked_positions(labels, ignore_index=2**32 - 100)
        assert index.tolist() == [0, 1, 2, 3] and int(count) == 4, backend


def test_value_checks_can_be_switched_off():
    # Without value checks nothing reads the tensors before the kernel: the
    # call proceeds (and a correct input still works).
    x = torch.randn(5, 4)
    with no_value_checks():
        assert gather_rows(x, torch.tensor([4])).shape == (1, 4)


def test_value_checks_read_each_checked_tensor_once(monkeypatch):
    # A range check is one read, not a min() and a max(); self-attention's key
    # sequences are the query ones, checked once.
    def reads(fn, *args, **kwargs):
        with HostReads(monkeypatch) as counter:
            fn(*args, **kwargs)
        return counter.count

    x, index = torch.randn(5, 4), torch.tensor([4, 0])
    assert reads(gather_rows, x, index) == 1
    q, k, v = _qkv()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert reads(attention, q, k, v, cu, 4) == 1
    assert reads(attention, q, k, v, cu, 4, cu_seqlens_k=cu.clone(), max_seqlen_k=4) == 2
    h, w = torch.randn(3, 8), torch.randn(10, 8)
    assert reads(mlm_cross_entropy, h, w, torch.tensor([1, 2, -100]), reduction="none") == 1
    ids = torch.randint(0, 10, (2, 6))
    assert reads(mask_tokens, ids, mask_token_id=3, vocab_size=10, seed=0) == 1
