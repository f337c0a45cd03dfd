"""The compiled (cpu, cuda) mlm_cross_entropy kernels against an fp64 reference.

The reference below is docs/ops.md's mlm_cross_entropy written out in fp64;
gradients are autograd of it (which is exactly the documented dz formula).
Errors are relative norm errors, ||out - ref|| / ||ref|| (tests/tolerances.py).
"""
from __future__ import annotations

import pytest
import torch

from fastmlm import _ext
from fastmlm.kernels.compiled import cross_entropy as ce
from tests.tolerances import RELATIVE_TOLERANCE as TOLERANCE
from tests.tolerances import relative_error

pytestmark = pytest.mark.skipif(ce.available("cpu") is not None, reason=str(ce.available("cpu")))

IGNORE = -100
HAS_CUDA_KERNELS = torch.cuda.is_available() and ce.available("cuda") is None
cuda_only = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and fastmlm._C built with CUDA")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Gradients the adapter allocates start as NaN, so a row no matmul wrote shows up."""
    monkeypatch.setattr(ce, "_POISON_OUTPUTS", True)


def reference(hidden, weight, bias, targets, grad_row_loss, *, label_smoothing=0.0, z_loss=0.0):
    """(row_loss, lse, d_hidden, d_weight, d_bias) in fp64, from docs/ops.md."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    z = h @ w.T + (0 if b is None else b)
    lse = torch.logsumexp(z, dim=1)
    kept = targets != IGNORE
    safe_targets = torch.where(kept, targets, 0)
    z_target = z.gather(1, safe_targets[:, None])[:, 0]
    ls = label_smoothing
    row_loss = (1 - ls) * (lse - z_target) + ls * (lse - z.mean(dim=1)) + z_loss * lse**2
    row_loss = torch.where(kept, row_loss, torch.zeros_like(row_loss))
    (row_loss * grad_row_loss.double()).sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (h, w)]
    d_bias = None if b is None else (b.grad if b.grad is not None else torch.zeros_like(b))
    return row_loss.detach(), lse.detach(), grads[0], grads[1], d_bias


def make_inputs(m, h, v, dtype, device="cpu", *, bias=True, weight_scale=0.5, ignored=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * weight_scale / h**0.5 * 3
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, (m,), generator=gen)
    targets[torch.randperm(m, generator=gen)[:ignored]] = IGNORE
    grad = torch.randn(m, generator=gen)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(device), grad.to(device)


def run_and_compare(hidden, weight, bias, targets, grad, *, tol, chunk_size=None, mode=None, **loss_args):
    row_loss, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=IGNORE,
                                             chunk_size=chunk_size, _mode=mode, **loss_args)
    d_hidden, d_weight, d_bias = ce.cross_entropy_backward(grad, hidden, weight, bias, targets, lse,
                                                           ignore_index=IGNORE, chunk_size=chunk_size,
                                                           _mode=mode, **loss_args)
    ref = reference(hidden, weight, bias, targets, grad, **loss_args)
    assert row_loss.dtype == lse.dtype == torch.float32
    assert d_hidden.dtype == d_weight.dtype == hidden.dtype and d_hidden.shape == hidden.shape
    assert d_weight.shape == weight.shape
    outs = [row_loss, lse, d_hidden, d_weight] + ([] if bias is None else [d_bias])
    names = ["row_loss", "lse", "d_hidden", "d_weight", "d_bias"]
    for name, out, r in zip(names, outs, ref):
        err = relative_error(out, r)  # also fails on NaN/inf
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    if bias is None:
        assert d_bias is None
    return row_loss, lse, d_hidden, d_weight, d_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_matches_reference(dtype, label_smoothing, z_loss):
    # V = 1000 with chunk 300: three full chunks and a partial one.
    inputs = make_inputs(37, 24, 1000, dtype, ignored=5)
    run_and_compare(*inputs, tol=TOLERANCE[dtype], chunk_size=300, label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-logits", "mkl-logits"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_forward_backward_in_one_chunk(dtype, onednn, bias, strided, monkeypatch):
    # The CPU one-chunk path: logits multiplied out once (oneDNN's linear where torch has
    # it and it is enabled), dz written over them; gradients of grad_scale * sum(row_loss).
    rows, vocab = 13, 301
    assert ce.fits_one_chunk("cpu", rows, vocab)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    assert ce._onednn_linear_available() == (onednn and torch.backends.mkldnn.is_available())
    hidden, weight, b, targets, _ = make_inputs(rows, 24, vocab, dtype, bias=bias, ignored=3)
    if strided:  # column-major hidden and weight, every other element of a bias twice as long
        hidden, weight = hidden.t().contiguous().t(), weight.t().contiguous().t()
        b = None if b is None else torch.stack([b, torch.full_like(b, 1e4)], dim=1).reshape(-1)[::2]
    out = ce.cross_entropy_forward_backward(hidden, weight, b, targets, ignore_index=IGNORE, label_smoothing=0.1,
                                            z_loss=1e-3, grad_scale=0.3)
    ref = reference(hidden, weight, b, targets, torch.full((rows,), 0.3), label_smoothing=0.1, z_loss=1e-3)
    assert out[2].dtype == out[3].dtype == dtype and (out[4] is None) == (not bias)
    for name, got, expected in zip(["row_loss", "lse", "d_hidden", "d_weight", "d_bias"], out, ref):
        if expected is not None:
            err = relative_error(got, expected)
            assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


def test_forward_backward_streamed_applies_grad_scale():
    # Too large for one chunk (or a chunk size given): forward, then the chunked backward weighted grad_scale.
    hidden, weight, b, targets, _ = make_inputs(9, 16, 251, torch.float32, ignored=2)
    out = ce.cross_entropy_forward_backward(hidden, weight, b, targets, ignore_index=IGNORE, chunk_size=64,
                                            grad_scale=-2.0)
    ref = reference(hidden, weight, b, targets, torch.full((9,), -2.0))
    for got, expected in zip(out, ref):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("vocab,chunk_size", [(41, 1), (251, 7), (251, 64), (251, 250), (251, 251), (251, 4096),
                                              (251, None)])
def test_chunk_sizes(vocab, chunk_size):
    inputs = make_inputs(9, 16, vocab, torch.float32, ignored=2)
    run_and_compare(*inputs, tol=1e-5, chunk_size=chunk_size, label_smoothing=0.1, z_loss=1e-3)


def test_results_do_not_depend_on_chunking_beyond_rounding():
    inputs = make_inputs(11, 16, 300, torch.float32)
    a = ce.cross_entropy_forward(*inputs[:4], chunk_size=300)
    b = ce.cross_entropy_forward(*inputs[:4], chunk_size=17)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_row(dtype):
    run_and_compare(*make_inputs(1, 8, 77, dtype), tol=TOLERANCE[dtype], chunk_size=10, label_smoothing=0.1)


def test_no_rows():
    hidden, weight, bias, targets, grad = make_inputs(0, 8, 50, torch.float32)
    row_loss, lse = ce.cross_entropy_forward(hidden, weight, bias, targets)
    assert row_loss.shape == lse.shape == (0,)
    d_hidden, d_weight, d_bias = ce.cross_entropy_backward(grad, hidden, weight, bias, targets, lse)
    assert d_hidden.shape == (0, 8)
    assert torch.equal(d_weight, torch.zeros_like(weight)) and torch.equal(d_bias, torch.zeros_like(bias))


def test_all_targets_ignored():
    hidden, weight, bias, targets, grad = make_inputs(6, 8, 50, torch.float32, ignored=6)
    row_loss, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, chunk_size=16, label_smoothing=0.1,
                                             z_loss=1e-2)
    assert torch.equal(row_loss, torch.zeros(6))
    assert torch.isfinite(lse).all()
    d_hidden, d_weight, d_bias = ce.cross_entropy_backward(grad, hidden, weight, bias, targets, lse, chunk_size=16,
                                                           label_smoothing=0.1, z_loss=1e-2)
    for g in (d_hidden, d_weight, d_bias):
        assert torch.equal(g, torch.zeros_like(g))


def test_no_bias():
    run_and_compare(*make_inputs(13, 16, 200, torch.float32, bias=False), tol=1e-5, chunk_size=64, z_loss=1e-3)


def test_large_logits_do_not_overflow():
    # Weights x100: logits of magnitude ~1e3, where exp overflows without the max shift.
    hidden, weight, bias, targets, grad = make_inputs(17, 16, 300, torch.float32)
    weight = weight * 100
    # fp32 logits of size 1e3 carry ~1e-4 absolute rounding from the matmul
    # itself, which the fp64 reference does not have; softmax weights inherit it.
    run_and_compare(hidden, weight, bias, targets, grad, tol=1e-4, chunk_size=64, label_smoothing=0.1, z_loss=1e-4)


def test_non_contiguous_inputs():
    hidden, weight, bias, targets, grad = make_inputs(10, 16, 120, torch.float32)
    wide = torch.zeros(10, 48)
    wide[:, ::3] = hidden  # column stride 3
    strided_hidden = wide[:, ::3]
    transposed_weight = weight.T.contiguous().T  # column-major [V, H]
    assert not strided_hidden.is_contiguous() and not transposed_weight.is_contiguous()
    run_and_compare(strided_hidden, transposed_weight, bias, targets, grad, tol=1e-5, chunk_size=50)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_precision_logits(dtype):
    # The CUDA fallback mode (logits and dz in the input dtype), run on the CPU
    # kernel: the fp16/bf16 load and store paths of the chunk passes. Logits
    # are kept small (|z| ~ 1) because this mode rounds them to the input dtype.
    inputs = make_inputs(21, 16, 130, dtype, weight_scale=0.2)
    run_and_compare(*inputs, tol=TOLERANCE[dtype], chunk_size=32, mode="native", label_smoothing=0.1)


class _TorchWithFp32OutMatmul:
    """torch, except that mm accepts out_dtype=torch.float32 on the CPU too."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return torch.mm(a, b, out=out)
        result = torch.mm(a.float(), b.float())
        return result if out is None else out.copy_(result)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_out_mode_on_cpu(dtype, monkeypatch):
    # The CUDA fp16/bf16 mode (fp32 logits, dz narrowed into the same bytes,
    # gradient matmuls in the input dtype), run with the CPU kernels; torch.mm's
    # out_dtype is CUDA-only, so it is emulated here.
    monkeypatch.setattr(ce, "torch", _TorchWithFp32OutMatmul())
    inputs = make_inputs(29, 16, 300, dtype, ignored=3)
    run_and_compare(*inputs, tol=TOLERANCE[dtype], chunk_size=64, mode="fp32_out", label_smoothing=0.1, z_loss=1e-3)


def test_first_call_probe_refuses_cuda_graph_capture(monkeypatch):
    # Probing torch.mm(out_dtype=...) inside a capture would record it in the graph (and a
    # failure would invalidate the capture): the warm-up step must answer it first.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ce._has_fp32_out_matmul.cache_clear()
    with pytest.raises(RuntimeError, match="warm-up"):
        ce._has_fp32_out_matmul(torch.device("cuda"), torch.bfloat16)
    ce._has_fp32_out_matmul.cache_clear()


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16])
def test_backward_narrowing_in_place_is_exact(grad_dtype):
    # fp32 logits, fp16/bf16 dz written into the same bytes (the CUDA fp32_out
    # mode): must equal the fp32 dz rounded, bit for bit.
    C = _ext.module()
    rows, cols, vocab = 5, 33, 100
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, cols, generator=gen) * 4
    targets = torch.tensor([3, IGNORE, 40, 32, 0])  # 40: outside this chunk (col_start 10)
    lse = torch.logsumexp(logits, 1) + 1.0
    grad = torch.randn(rows, generator=gen)
    args = (rows, cols, 10, targets.data_ptr(), lse.data_ptr(), grad.data_ptr(), vocab, IGNORE, 0.1, 1e-3, 1, -1, 0)
    dz32 = torch.full_like(logits, float("nan"))
    C.cross_entropy_chunk_backward(logits.data_ptr(), 0, cols, dz32.data_ptr(), 0, cols, *args)
    dz_low = logits.view(grad_dtype)[:, :cols]
    tag = _ext.dtype_tag(dz_low)
    C.cross_entropy_chunk_backward(logits.data_ptr(), 0, cols, dz_low.data_ptr(), tag, dz_low.stride(0), *args)
    assert torch.equal(dz_low, dz32.to(grad_dtype))
    assert torch.equal(dz32[1], torch.zeros(cols))


def test_openmp_rows_match_serial(monkeypatch):
    # 64 rows x 1024 columns is above the kernels' parallel threshold.
    inputs = make_inputs(64, 16, 2048, torch.float32, ignored=3)
    kwargs = dict(chunk_size=1024, label_smoothing=0.1, z_loss=1e-3)

    def run():
        row_loss, lse = ce.cross_entropy_forward(*inputs[:4], **kwargs)
        return (row_loss, lse, *ce.cross_entropy_backward(inputs[4], *inputs[:4], lse, **kwargs))

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    serial = run()
    monkeypatch.setattr(ce, "_SERIAL_PASS_MAX_THREADS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # more threads than cores is fine
    parallel = run()
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


def test_nan_hidden_gives_nan_loss():
    hidden, weight, bias, targets, _ = make_inputs(4, 8, 64, torch.float32)
    hidden[2, 0] = float("nan")
    row_loss, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, chunk_size=16)
    assert torch.isnan(row_loss[2]) and torch.isnan(lse[2])
    assert torch.isfinite(row_loss[[0, 1, 3]]).all()


def test_bad_inputs_raise():
    hidden, weight, bias, targets, grad = make_inputs(4, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="targets must be in"):
        ce.cross_entropy_forward(hidden, weight, bias, torch.tensor([0, 1, 64, 2]))
    with pytest.raises(ValueError, match="int64"):
        ce.cross_entropy_forward(hidden, weight, bias, targets.int())
    with pytest.raises(ValueError, match="disagree on H"):
        ce.cross_entropy_forward(hidden[:, :4], weight, bias, targets)
    with pytest.raises(TypeError, match="same dtype"):
        ce.cross_entropy_forward(hidden, weight.double(), bias, targets)
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.cross_entropy_forward(hidden, weight, bias, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        ce.cross_entropy_forward(hidden, weight, bias, targets, chunk_size=0)
    with pytest.raises(ValueError, match="lse must be"):
        ce.cross_entropy_backward(grad, hidden, weight, bias, targets, torch.zeros(3))


def test_default_chunk_size_bounds_memory():
    budget = 16 << 20
    for vocab in (1, 63, 1000, 30522, 50265, 250002):
        for rows in (1, 150, 2000, 16384):
            chunk = ce.default_chunk_size(vocab, rows)
            assert 1 <= chunk <= vocab
            # At most ~1/8 of the [M, V] logits, or 16 MiB when that is more
            # (+64 columns of rounding).
            allowed_columns = max(vocab / 8 + 1, budget / (4 * rows)) + 64
            assert chunk <= allowed_columns, (vocab, rows, chunk)
    assert ce.default_chunk_size(30522, 2000) == 3840  # 12.6% of M * V
    assert ce.default_chunk_size(30522, 150) == 15296  # two balanced chunks, 9 MiB
    assert ce.default_chunk_size(30522, 150, 4 * 768) < 4600  # fp32 weight-chunk copies count too


# --- CUDA (run when a GPU and a CUDA build are present) -----------------------

@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [None, "native"])
def test_cuda_matches_reference_bert_vocab(dtype, mode):
    if mode == "native" and dtype == torch.float32:
        pytest.skip("native is the fp16/bf16 fallback mode")
    inputs = make_inputs(300, 768, 30522, dtype, "cuda", weight_scale=0.5, ignored=40)
    # The native fallback rounds logits to fp16: a few times fp16 epsilon.
    tol = 3e-3 if (mode == "native" and dtype == torch.float16) else TOLERANCE[dtype]
    run_and_compare(*inputs, tol=tol, mode=mode, label_smoothing=0.1, z_loss=1e-4)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_edge_shapes(dtype):
    tol = TOLERANCE[dtype]
    run_and_compare(*make_inputs(1, 64, 1000, dtype, "cuda"), tol=tol, chunk_size=100)
    run_and_compare(*make_inputs(33, 64, 1001, dtype, "cuda", ignored=7), tol=tol, chunk_size=97,
                    label_smoothing=0.1, z_loss=1e-3)
    hidden, weight, bias, targets, grad = make_inputs(8, 64, 500, dtype, "cuda", ignored=8)
    row_loss, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, chunk_size=128)
    assert torch.equal(row_loss, torch.zeros_like(row_loss))
    grads = ce.cross_entropy_backward(grad, hidden, weight, bias, targets, lse, chunk_size=128)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    hidden, weight, bias, targets, grad = make_inputs(0, 64, 500, dtype, "cuda")
    assert ce.cross_entropy_forward(hidden, weight, bias, targets)[0].shape == (0,)


@cuda_only
def test_cuda_large_logits_and_strides():
    hidden, weight, bias, targets, grad = make_inputs(40, 64, 3000, torch.float32, "cuda")
    wide = torch.zeros(40, 128, device="cuda")
    wide[:, ::2] = hidden
    run_and_compare(wide[:, ::2], weight * 100, bias, targets, grad, tol=1e-4, chunk_size=512, label_smoothing=0.1)


@cuda_only
def test_cuda_deterministic_and_close_to_cpu():
    inputs = make_inputs(64, 128, 5000, torch.float32, "cuda", ignored=4)
    first = ce.cross_entropy_forward(*inputs[:4], z_loss=1e-3)
    again = ce.cross_entropy_forward(*inputs[:4], z_loss=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    grads = ce.cross_entropy_backward(inputs[4], *inputs[:4], first[1], z_loss=1e-3)
    grads_again = ce.cross_entropy_backward(inputs[4], *inputs[:4], first[1], z_loss=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    cpu = [None if t is None else t.cpu() for t in inputs]
    cpu_loss, cpu_lse = ce.cross_entropy_forward(*cpu[:4], z_loss=1e-3)
    torch.testing.assert_close(first[0].cpu(), cpu_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[1].cpu(), cpu_lse, rtol=1e-5, atol=1e-5)


@cuda_only
def test_cuda_out_of_range_target_gives_nan_not_a_crash():
    hidden, weight, bias, targets, _ = make_inputs(4, 32, 100, torch.float32, "cuda")
    targets[1] = 100
    row_loss, _ = ce.cross_entropy_forward(hidden, weight, bias, targets, chunk_size=32)
    assert torch.isnan(row_loss[1]) and torch.isfinite(row_loss[[0, 2, 3]]).all()
