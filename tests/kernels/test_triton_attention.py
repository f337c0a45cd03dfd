"""Triton attention kernels vs a float64 PyTorch reference, forward and gradients.

On a machine without CUDA the kernels run in the Triton interpreter on CPU
tensors with tiny shapes; with CUDA the same cases run on the GPU, plus bf16,
BERT-sized shapes and a comparison with `F.scaled_dot_product_attention`.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit functions are defined (i.e. before the import below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastmlm.kernels.triton import attention as triton_attention  # noqa: E402
from fastmlm.kernels.triton.attention import MAX_SEQUENCES, attention_backward, attention_forward  # noqa: E402
from fastmlm.kernels.triton.random import counter_hash as triton_counter_hash, load_seed_words  # noqa: E402
from fastmlm.ops.attention import MAX_TRITON_SEQUENCES  # noqa: E402
from fastmlm.reference.random import STREAM_DROPOUT, counter_hash, seed_to_int64, split_seed, threshold24  # noqa: E402
from tests.tolerances import RELATIVE_TOLERANCE, relative_error  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not CUDA and not INTERPRETING:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

def cu_seqlens_of(lengths):
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def reference_attention(q, k, v, cu_q, cu_k, *, causal, softmax_scale, dropout_p, seed):
    """float64 per-sequence softmax(q k^T * scale + mask) v with the hash dropout; (out, lse).

    Differentiable in q, k, v. A query that sees no key gets output 0, lse -inf.
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    heads = q.shape[1]
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = qe - qs, ke - ks
        rows = torch.arange(lq, device=q.device)[:, None]
        cols = torch.arange(lk, device=q.device)[None, :]
        visible = cols < lk
        if causal:
            visible = visible & (cols <= rows + lk - lq)
        visible = visible.expand(lq, lk)
        has_key = visible.any(1)
        scores = torch.einsum("ihd,jhd->hij", q64[qs:qe], k64[ks:ke]) * softmax_scale
        scores = scores.masked_fill(~visible, float("-inf"))
        # Rows that see no key: softmax over zeros, then zeroed (keeps autograd finite).
        scores = torch.where(has_key[:, None], scores, torch.zeros_like(scores))
        weights = torch.softmax(scores, -1) * has_key[:, None]
        lse = torch.logsumexp(scores, -1).detach().masked_fill(~has_key, float("-inf"))
        if dropout_p > 0:
            head_ids = torch.arange(heads, device=q.device)[:, None, None]
            i = torch.arange(qs, qe, device=q.device)[None, :, None]
            j = torch.arange(ks, ke, device=q.device)[None, None, :]
            dropped = (counter_hash(seed, STREAM_DROPOUT + head_ids, i, j) >> 8) < threshold24(dropout_p)
            weights = weights.masked_fill(dropped, 0.0) / (1.0 - dropout_p)
        outs.append(torch.einsum("hij,jhd->ihd", weights, v64[ks:ke]))
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rel_err(actual, expected):
    """Relative norm error (raises on NaN/inf in `actual`, e.g. an unwritten poisoned element)."""
    return relative_error(actual, expected) if expected.numel() else 0.0


def assert_lse_close(lse, lse_ref, tol):
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isneginf(lse), ~finite), "lse must be -inf exactly where a query sees no key"
    assert rel_err(lse[finite], lse_ref[finite]) < tol


def make_qkv(lengths_q, lengths_k, heads, head_dim, dtype, *, fused=False, seed=0):
    """Random q [Tq, heads, D], k/v [Tk, heads, D]; fused=True slices them from one
    [T, 3, heads, D] tensor (non-contiguous views), which needs Tq == Tk."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    if fused:
        assert tq == tk
        qkv = torch.randn(tq, 3, heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = torch.randn(tq, heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    k = torch.randn(tk, heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    v = torch.randn(tk, heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    return q, k, v


def nan_poisoned_empty(real_empty):
    """torch.empty that fills float tensors with NaN, so any element a kernel fails to write shows."""
    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor
    return empty


def check_against_reference(lengths_q, lengths_k, *, heads, head_dim, dtype, causal, dropout_p,
                            fused=False, config=None, seed=1234, monkeypatch=None):
    q, k, v = make_qkv(lengths_q, lengths_k, heads, head_dim, dtype, fused=fused)
    cu_q, cu_k = cu_seqlens_of(lengths_q), cu_seqlens_of(lengths_k)
    scale = head_dim ** -0.5
    kwargs = dict(causal=causal, softmax_scale=scale, dropout_p=dropout_p, seed=seed)
    if monkeypatch is not None:
        monkeypatch.setattr(triton_attention.torch, "empty", nan_poisoned_empty(torch.empty))
    out, lse = attention_forward(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), config=config, **kwargs)
    gen = torch.Generator(device="cpu").manual_seed(7)
    grad_out = torch.randn(q.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                    config=config, **kwargs)
    if monkeypatch is not None:
        monkeypatch.undo()

    q_ref, k_ref, v_ref = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = reference_attention(q_ref, k_ref, v_ref, cu_q, cu_k, **kwargs)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(out_ref, (q_ref, k_ref, v_ref), grad_out.double())

    tol = RELATIVE_TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert rel_err(out, out_ref) < tol, f"out rel err {rel_err(out, out_ref)}"
    assert_lse_close(lse, lse_ref, tol)
    for name, grad, grad_ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert not grad.isnan().any(), f"{name} has NaN (unwritten or bad arithmetic)"
        assert rel_err(grad, grad_ref) < tol, f"{name} rel err {rel_err(grad, grad_ref)}"
    return out, lse, (dq, dk, dv)


@triton.jit
def _hash_kernel(Out, A, B, seed_lo, seed_hi, stream, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(A + offs).to(tl.uint32)
    b = tl.load(B + offs).to(tl.uint32)
    h = triton_counter_hash(seed_lo, seed_hi, stream, a, b)
    tl.store(Out + offs, h.to(tl.int64) & 0xFFFFFFFF)


def triton_hash(seed, stream, a, b):
    a = torch.as_tensor(a, dtype=torch.int64, device=DEVICE)
    b = torch.as_tensor(b, dtype=torch.int64, device=DEVICE).expand_as(a).contiguous()
    out = torch.full(a.shape, -1, dtype=torch.int64, device=DEVICE)
    _hash_kernel[(1,)](out, a, b, *split_seed(seed), stream, N=a.numel())
    return out


def test_counter_hash_matches_reference():
    # docs/ops.md test vectors, then random counters against the reference.
    assert triton_hash(0, 0, [0, 1, 2, 3], [0]).tolist() == [1351578270, 3871376586, 2659491925, 4242526263]
    assert triton_hash(2**64 - 1, 5, [2**32 - 1, 2**32 - 1], [7]).tolist() == [2033577350] * 2
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64)
    b = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64)
    for seed, stream in ((1, 0x100), (2**31 + 12345, 0x10B), (2**63 + 99, 2)):
        expected = counter_hash(seed, stream, a, b)
        assert torch.equal(triton_hash(seed, stream, a, b).cpu(), expected)


@triton.jit
def _seeded_hash_kernel(Out, A, Seed, stream, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(A + offs).to(tl.uint32)
    seed_lo, seed_hi = load_seed_words(Seed)
    h = triton_counter_hash(seed_lo, seed_hi, stream, a, a ^ 0x5BD1E995)
    tl.store(Out + offs, h.to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 12345, 2**62 + 3, 2**63 + 99, 2**64 - 1])
def test_seed_tensor_words_match_int_seed(seed):
    # The kernel splits an int64 seed tensor (negative for seeds >= 2**63) into the
    # same words the reference hashes, and so does the reference given the tensor.
    a = torch.arange(32, dtype=torch.int64) * 2654435761 % 2**32
    seed_tensor = torch.tensor(seed_to_int64(seed), dtype=torch.int64)
    expected = counter_hash(seed, 0x101, a, a ^ 0x5BD1E995)
    assert torch.equal(counter_hash(seed_tensor, 0x101, a, a ^ 0x5BD1E995), expected)
    out = torch.full((32,), -1, dtype=torch.int64, device=DEVICE)
    _seeded_hash_kernel[(1,)](out, a.to(DEVICE), seed_tensor.to(DEVICE), 0x101, N=32)
    assert torch.equal(out.cpu(), expected)


# Lengths chosen to be ragged against 16-row tiles, with a length-1 and an empty sequence.
LENGTHS = [5, 0, 13, 1, 17]
# Queries fewer or more than keys per sequence. Causal aligns the ends: 6 queries on
# 3 keys leaves rows that see no key at all; 3 queries on 17 keys (offset 14) puts the
# first fully visible 16-key tile boundary right at the causal edge.
LENGTHS_Q = [3, 0, 13, 6, 1]
LENGTHS_K = [17, 2, 7, 3, 20]


# Each head dim (24: BLOCK_D 32 with 8 masked features) with and without causal and dropout.
@pytest.mark.parametrize("head_dim, causal, dropout_p", [
    (16, False, 0.0), (16, True, 0.3), (24, False, 0.3), (24, True, 0.0), (32, False, 0.0), (32, True, 0.3),
])
def test_self_attention_fp32(head_dim, causal, dropout_p, monkeypatch):
    check_against_reference(LENGTHS, LENGTHS, heads=2, head_dim=head_dim, dtype=torch.float32,
                            causal=causal, dropout_p=dropout_p, monkeypatch=monkeypatch)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cross_lengths_fp32(causal, dropout_p, monkeypatch):
    check_against_reference(LENGTHS_Q, LENGTHS_K, heads=2, head_dim=16, dtype=torch.float32,
                            causal=causal, dropout_p=dropout_p, monkeypatch=monkeypatch)


def test_head_dim_8_padded_to_16_fp16():
    check_against_reference([3, 9], [3, 9], heads=1, head_dim=8, dtype=torch.float16, causal=True, dropout_p=0.5)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_views_fp16(causal, monkeypatch):
    check_against_reference(LENGTHS, LENGTHS, heads=2, head_dim=24, dtype=torch.float16,
                            causal=causal, dropout_p=0.1, fused=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_views_bf16(causal, monkeypatch):
    # In the interpreter too: fastmlm's shim widens bf16 dot operands (Triton 3.6 multiplies their bits).
    check_against_reference(LENGTHS, LENGTHS, heads=2, head_dim=32, dtype=torch.bfloat16,
                            causal=causal, dropout_p=0.1, fused=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("causal", [False, True])
def test_int64_row_offsets_variant(causal, monkeypatch):
    # The variant compiled for sequences whose row x stride passes 2**31, forced on small ones.
    monkeypatch.setattr(triton_attention, "offsets_need_int64", lambda terms: True)
    check_against_reference(LENGTHS_Q, LENGTHS_K, heads=2, head_dim=16, dtype=torch.float32,
                            causal=causal, dropout_p=0.2)


def test_int64_row_offsets_chosen_where_int32_would_wrap():
    rows = torch.empty(1, 16, 128, device="meta")  # row stride 2048
    fused = torch.empty(1, 3, 16, 128, device="meta")[:, 0]  # row stride 6144
    wide = triton_attention._wide_rows
    # (L - 1) * 2048 + 127 reaches 2**31 from L = 1,048,577 (one sequence of a million tokens).
    assert not wide(1_048_576, 512, (rows,), (rows,)) and wide(1_048_577, 512, (rows,), (rows,))
    assert not wide(512, 349_526, (rows,), (fused,)) and wide(512, 349_527, (rows,), (fused,))


@pytest.mark.parametrize("config, causal", [
    ({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}, True),
    ({"BLOCK_M": 32, "BLOCK_N": 16, "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32}}, True),
    ({"BLOCK_M": 32, "BLOCK_N": 16, "fwd": {"BLOCK_N": 32}, "dq": {"BLOCK_M": 16}}, False),
])
def test_explicit_configs(config, causal):
    check_against_reference(LENGTHS_Q, LENGTHS_K, heads=2, head_dim=16, dtype=torch.float32,
                            causal=causal, dropout_p=0.25, config=config)


def test_deterministic_and_seed_dependent():
    q, k, v = make_qkv([9, 4], [9, 4], 2, 16, torch.float32)
    cu = cu_seqlens_of([9, 4])
    kwargs = dict(causal=False, softmax_scale=0.25, dropout_p=0.5)
    out1, lse1 = attention_forward(q, k, v, cu, cu, 9, 9, seed=5, **kwargs)
    out2, lse2 = attention_forward(q, k, v, cu, cu, 9, 9, seed=5, **kwargs)
    out3, lse3 = attention_forward(q, k, v, cu, cu, 9, 9, seed=2**64 - 1, **kwargs)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert not torch.equal(out1, out3) and torch.equal(lse1, lse3)  # dropout does not touch lse
    grads1 = attention_backward(out1, q, k, v, out1, lse1, cu, cu, 9, 9, seed=5, **kwargs)
    grads2 = attention_backward(out1, q, k, v, out1, lse1, cu, cu, 9, 9, seed=5, **kwargs)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


def test_tensor_seed_is_read_at_launch():
    """A 0-d int64 seed tensor gives the int seed's bits, read when the kernel runs.

    Refilling the tensor in place changes the mask: what a CUDA graph replay
    relies on when a captured `torch.randint` writes a new seed into it.
    """
    q, k, v = make_qkv([9, 4], [9, 4], 2, 16, torch.float32)
    cu = cu_seqlens_of([9, 4])
    kwargs = dict(causal=True, softmax_scale=0.25, dropout_p=0.5)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    seed = torch.tensor(seed_to_int64(2**63 + 99), dtype=torch.int64, device=DEVICE)
    for value in (2**63 + 99, 5):
        seed.fill_(seed_to_int64(value))
        expected = attention_forward(q, k, v, cu, cu, 9, 9, seed=value, **kwargs)
        actual = attention_forward(q, k, v, cu, cu, 9, 9, seed=seed, **kwargs)
        assert all(torch.equal(a, e) for a, e in zip(actual, expected)), value
        out, lse = expected
        grads_expected = attention_backward(grad_out, q, k, v, out, lse, cu, cu, 9, 9, seed=value, **kwargs)
        grads_actual = attention_backward(grad_out, q, k, v, out, lse, cu, cu, 9, 9, seed=seed, **kwargs)
        assert all(torch.equal(a, e) for a, e in zip(grads_actual, grads_expected)), value
    other = attention_forward(q, k, v, cu, cu, 9, 9, seed=2**63 + 99, **kwargs)[0]
    assert not torch.equal(other, actual[0])
    # A CPU seed tensor is accepted for device inputs too.
    cpu_seed = attention_forward(q, k, v, cu, cu, 9, 9, seed=torch.tensor(5), **kwargs)[0]
    assert torch.equal(cpu_seed, expected[0])


@pytest.mark.parametrize("seed, error", [
    (torch.tensor(5, dtype=torch.int32), ValueError),
    (torch.tensor([5]), ValueError),
    (5.0, TypeError),
])
def test_bad_seed_raises_before_launch(seed, error):
    q, k, v = make_qkv([3], [3], 1, 8, torch.float32)
    cu = cu_seqlens_of([3])
    with pytest.raises(error, match="seed"):
        attention_forward(q, k, v, cu, cu, 3, 3, causal=False, softmax_scale=1.0, dropout_p=0.5, seed=seed)


def test_dropout_everything():
    q, k, v = make_qkv([4, 3], [4, 3], 1, 8, torch.float32)
    cu = cu_seqlens_of([4, 3])
    out, lse = attention_forward(q, k, v, cu, cu, 4, 4, causal=False, softmax_scale=1.0, dropout_p=1.0, seed=0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(lse).all()


class _RecordOps(TorchDispatchMode):
    """Records every aten op and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else [result]
        self.ops.append((str(func), [tuple(t.shape) for t in outputs if isinstance(t, torch.Tensor)]))
        return result


def test_no_aten_math_and_no_seq_by_seq_tensors():
    # D = 8 keeps every legitimate tensor free of two dims >= the sequence length 13.
    q, k, v = make_qkv([7, 13], [7, 13], 2, 8, torch.float32)
    cu = cu_seqlens_of([7, 13])
    kwargs = dict(causal=True, softmax_scale=0.3, dropout_p=0.2, seed=4)
    with _RecordOps() as recorder:
        out, lse = attention_forward(q, k, v, cu, cu, 13, 13, **kwargs)
        attention_backward(out, q, k, v, out, lse, cu, cu, 13, 13, **kwargs)
    forbidden = ("mm", "matmul", "softmax", "attention", "exp", "bmm", "einsum")
    for name, shapes in recorder.ops:
        assert not any(word in name for word in forbidden), f"aten op {name} on the kernel path"
        for shape in shapes:
            assert sum(dim >= 13 for dim in shape) < 2, f"{name} made a [seq, seq]-like tensor {shape}"


def test_bad_inputs_raise():
    q, k, v = make_qkv([4], [4], 2, 16, torch.float32)
    cu = cu_seqlens_of([4])
    kwargs = dict(causal=False, softmax_scale=0.25, dropout_p=0.0, seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        attention_forward(q[..., :12], k[..., :12], v[..., :12], cu, cu, 4, 4, **kwargs)
    with pytest.raises(ValueError, match="int32"):
        attention_forward(q, k, v, cu.long(), cu, 4, 4, **kwargs)
    with pytest.raises(TypeError, match="dtypes differ"):
        attention_forward(q, k.half(), v, cu, cu, 4, 4, **kwargs)
    with pytest.raises(ValueError, match="heads"):
        attention_forward(q, k[:, :1], v[:, :1], cu, cu, 4, 4, **kwargs)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_forward(q, k, v, cu, cu, 4, 4, causal=False, softmax_scale=0.25, dropout_p=1.5, seed=0)
    with pytest.raises(ValueError, match="unknown attention config"):
        attention_forward(q, k, v, cu, cu, 4, 4, config={"BLOCK_K": 16}, **kwargs)
    with pytest.raises(ValueError, match="power of two"):
        attention_forward(q, k, v, cu, cu, 4, 4, config={"BLOCK_M": 24}, **kwargs)
    many = torch.arange(MAX_SEQUENCES + 2, dtype=torch.int32, device=DEVICE)  # one token each
    one_per_sequence = torch.randn(MAX_SEQUENCES + 1, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="grid holds at most 65535"):
        attention_forward(one_per_sequence, one_per_sequence, one_per_sequence, many, many, 1, 1, **kwargs)
    assert MAX_SEQUENCES == MAX_TRITON_SEQUENCES  # the dispatcher declines before this check
    out, lse = attention_forward(q, k, v, cu, cu, 4, 4, **kwargs)
    with pytest.raises(ValueError, match="lse"):
        attention_backward(out, q, k, v, out, lse[:1], cu, cu, 4, 4, **kwargs)


# ---- GPU only ------------------------------------------------------------------------------------

def gpu_only(test):
    skip = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (shapes too large for the interpreter)")
    return pytest.mark.gpu(skip(test))


@gpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_bert_sized(causal, dropout_p, dtype, monkeypatch):
    lengths = [512, 1, 300, 0, 127, 64, 511, 200]
    check_against_reference(lengths, lengths, heads=12, head_dim=64, dtype=dtype, causal=causal,
                            dropout_p=dropout_p, fused=True, monkeypatch=monkeypatch)


@gpu_only
@pytest.mark.parametrize("head_dim", [8, 32, 40, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_head_dims_cross_lengths(head_dim, causal):
    check_against_reference([100, 3, 257, 0], [77, 9, 300, 5], heads=3, head_dim=head_dim,
                            dtype=torch.bfloat16, causal=causal, dropout_p=0.15)


@gpu_only
def test_gpu_fp32_and_seed_words():
    check_against_reference([70, 33], [70, 33], heads=2, head_dim=64, dtype=torch.float32, causal=True,
                            dropout_p=0.3, seed=1)
    check_against_reference([70, 33], [70, 33], heads=2, head_dim=64, dtype=torch.float32, causal=False,
                            dropout_p=0.3, seed=2**64 - 1)


@gpu_only
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_sdpa(causal):
    lengths = [512, 384, 17, 256, 1, 511, 128, 300]
    q, k, v = make_qkv(lengths, lengths, 12, 64, torch.bfloat16, fused=True)
    cu = cu_seqlens_of(lengths)
    out, _ = attention_forward(q, k, v, cu, cu, 512, 512, causal=causal, softmax_scale=0.125,
                               dropout_p=0.0, seed=0)
    for b in range(len(lengths)):
        s, e = int(cu[b]), int(cu[b + 1])
        expected = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
            is_causal=causal, scale=0.125).transpose(0, 1)
        assert rel_err(out[s:e], expected) < 2e-2
