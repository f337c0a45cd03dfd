"""mlm_cross_entropy on the compiled backends (`cpu`, `cuda`): streamed
softmax cross-entropy over vocabulary chunks (semantics: docs/ops.md).

The logits z = hidden @ weight.T + bias [M, V] are never materialised. The
vocabulary is cut into chunks of `chunk_size` columns; for each chunk a torch
matmul (MKL / cuBLAS) writes the chunk's logits [M, chunk] into ONE buffer
reused by every chunk, and a compiled kernel (csrc/{cpu,cuda}/cross_entropy.*,
math in csrc/common/cross_entropy.h) makes one pass over it:

- forward: folds the chunk into each row's running state (max, sum of
  exp(z - max), target logit, sum of logits: an online log-sum-exp); after the
  last chunk a finalize writes lse and the row loss;
- backward: recomputes the chunk's logits and writes dz over them in place,
  then d_hidden += dz @ W_chunk, d_weight[chunk] = dz.T @ hidden and
  d_bias[chunk] = dz.T @ ones are torch matmuls. No atomics: every
  d_weight row is written by exactly one matmul, d_hidden accumulates chunk by
  chunk in a fixed order.

Extra memory is the [M, chunk] buffer (plus, for fp16/bf16 on the CPU, a
[chunk, H] fp32 copy of the weight chunk). `default_chunk_size` gives each
chunk the larger of two allowances, then balances the chunks:
- 1/8 of the vocabulary (at most 4096 columns, rounded up to 64): the buffer
  stays at ~1/8 of M*V whatever M is (3840 columns for V = 30522 at M = 2000);
- whatever fits in 16 MiB: at small M that is a few wide chunks instead of 8
  thin ones (2 chunks of 15296 columns, a 9 MiB buffer, at M = 150), because
  each chunk costs 4 matmul calls and on CPU thin ones run slower per FLOP;
  measured on the 2-core dev machine, forward + backward at M = 150 took
  2.3 s with 8 chunks, 1.9 s with 4 and 1.5 s with 1.
Precision. The kernels always accumulate in fp32. Where the logits come from:
- fp32 inputs: fp32 matmuls throughout.
- fp16/bf16 on the CPU: hidden is widened once and each weight chunk per chunk,
  so logits, dz and all gradient matmuls are fp32 (CPU fp32 GEMM is as fast as
  fp16/bf16 GEMM on machines without AMX, and this is the precise path).
- fp16/bf16 on CUDA: the logits matmul writes fp32 (`torch.mm(out_dtype=
  torch.float32)`, tensor cores, fp32 accumulate) so the softmax never sees
  logits rounded to 8 (bf16) or 11 (fp16) bits - with |z| ~ 10 a bf16 logit
  carries an absolute error of ~0.03, a 3% error in its softmax weight. dz is
  then written back narrowed to the input dtype in the same bytes (the kernel
  stages the row so this is safe) to feed tensor-core gradient matmuls; that
  rounds dz once to the input precision (relative 2^-9 / 2^-12 per element),
  and in fp16 rounds entries below ~3e-8 to zero: without a loss scaler the
  small softmax terms of a mean over many rows vanish, as in PyTorch's fp16
  cross-entropy (docs/ops.md; the Triton backend scales tiles into range).
  d_hidden accumulates over chunks in fp32. If this torch has no fp32-output
  matmul for the dtype, the logits buffer is the input dtype instead (a
  coarser but still fp32-accumulated path).
"""
from __future__ import annotations

import functools
import math

import torch

from fastmlm import _ext

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_CHUNK = 4096
_MIN_CHUNKS = 8
_CHUNK_ALIGN = 64
_CHUNK_BUDGET_BYTES = 16 << 20
# Logit buffer modes (see the module docstring).
_FP32 = "fp32"            # fp32 inputs, fp32 logits and dz
_WIDEN = "widen"          # fp16/bf16 inputs widened to fp32 before every matmul (CPU)
_FP32_OUT = "fp32_out"    # fp16/bf16 matmuls with fp32 logits; dz narrowed in place (CUDA)
_NATIVE = "native"        # fp16/bf16 logits and dz in the input dtype (CUDA fallback)
# On machines with few cores the CPU chunk pass runs on one thread. It costs
# ~2% of the matmul that produced the chunk (one exp per logit against H
# multiply-adds), so a second thread saves ~1%, while an OpenMP barrier costs
# a scheduler time slice whenever the cores are oversubscribed: measured on
# the 2-core dev machine under load, 180-270 ms of pass time per bert-base
# forward with 2 threads against 17-26 ms with one. With many cores the
# matmul is that much faster and the pass is spread over torch's thread count.
_SERIAL_PASS_MAX_THREADS = 4
# The CUDA kernel stages a narrowed (fp32 -> fp16/bf16) dz row in 48 KiB of
# shared memory, so that mode's chunks are capped at 24576 columns.
_MAX_NARROWED_CHUNK = 24576
# Tests set this: gradient outputs start as NaN instead of uninitialised, so
# a row no matmul wrote cannot pass unnoticed.
_POISON_OUTPUTS = False


def available(device_type: str, device: torch.device | None = None) -> str | None:
    """None if the compiled kernels can run on `device_type` ('cpu' or 'cuda') tensors on `device`, else why not."""
    reason = _ext.unavailable_reason(device_type, device)
    if reason is not None:
        return reason
    if not hasattr(_ext.module(), "cross_entropy_chunk_forward"):
        return "fastmlm._C was built without the cross_entropy kernels (csrc/bind_cross_entropy.cpp); rebuild it"
    return None


def default_chunk_size(vocab_size: int, rows: int = 0, extra_bytes_per_column: int = 0) -> int:
    """Columns per vocabulary chunk for `rows` rows (see the module docstring).

    extra_bytes_per_column: other memory that scales with the chunk width
    (the fp32 weight-chunk copy of fp16/bf16 inputs on the CPU: 4 * H).
    """
    fraction_columns = math.ceil(vocab_size / max(_MIN_CHUNKS, math.ceil(vocab_size / _MAX_CHUNK)))
    bytes_per_column = 4 * rows + extra_bytes_per_column
    budget_columns = _CHUNK_BUDGET_BYTES // bytes_per_column if bytes_per_column else vocab_size
    allowed = max(fraction_columns, budget_columns // _CHUNK_ALIGN * _CHUNK_ALIGN, 1)
    chunks = math.ceil(vocab_size / allowed)  # then equal widths, not a thin last chunk
    chunk = math.ceil(vocab_size / chunks / _CHUNK_ALIGN) * _CHUNK_ALIGN
    return max(1, min(vocab_size, chunk))


@functools.lru_cache(maxsize=None)
def _has_fp32_out_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(out_dtype=torch.float32) works for `dtype` on `device` (asked once)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The probe would be captured into the graph, and a failure there would
        # invalidate the capture; the warm-up step CUDA graphs need answers it first.
        raise RuntimeError("the cuda cross-entropy's first fp16/bf16 call is being captured in a CUDA graph: "
                           "run one step eagerly before capturing (the usual warm-up)")
    try:
        a = torch.zeros(2, 2, dtype=dtype, device=device)
        torch.mm(a, a, out_dtype=torch.float32, out=torch.empty(2, 2, device=device))
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _chunk_columns(vocab: int, rows: int, width: int, chunk_size: int | None, mode: str) -> int:
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, rows, 4 * width if mode == _WIDEN else 0)
    chunk = min(vocab, chunk_size)
    return min(chunk, _MAX_NARROWED_CHUNK) if mode == _FP32_OUT else chunk


def _onednn_linear_available() -> bool:
    """Whether torch's oneDNN linear (the op Inductor's CPU backend calls) can serve fp32 logits.

    At the one-chunk path's shapes (M of ~150 rows against a [V, H] weight) it is
    ~25% faster than MKL's sgemm (torch.addmm) on the dev machine (AMD EPYC, 2
    cores, AVX2): 62-65 ms against 86-90 ms for [154, 768] x [768, 30522]. At
    large M (2000 rows, the streamed path) MKL is faster, so only whole() uses it.
    Read on every call: `torch.backends.mkldnn.enabled` is a user switch.
    """
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _has_onednn_linear()


@functools.lru_cache(maxsize=None)
def _has_onednn_linear() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _pick_mode(hidden: torch.Tensor) -> str:
    if hidden.dtype == torch.float32:
        return _FP32
    if hidden.device.type == "cpu":
        return _WIDEN
    return _FP32_OUT if _has_fp32_out_matmul(hidden.device, hidden.dtype) else _NATIVE


def _cpu_pass_threads() -> int:
    threads = torch.get_num_threads()
    return 1 if threads <= _SERIAL_PASS_MAX_THREADS else threads


class _ChunkedLogits:
    """Produces chunk logits into the one reused buffer and holds what the
    gradient matmuls of a chunk need, for one buffer mode."""

    def __init__(self, hidden, weight, bias, mode: str, chunk_size: int):
        self.mode = mode
        self.hidden = hidden.float() if mode == _WIDEN else hidden
        self.weight = weight
        self.bias = bias
        self.rows = hidden.shape[0]
        self.logit_dtype = hidden.dtype if mode == _NATIVE else torch.float32
        self.chunk_size = chunk_size
        self.buffer = None  # allocated by the first logits() call: whole() needs none

    def weight_chunk(self, start: int, stop: int) -> torch.Tensor:
        w = self.weight[start:stop]
        return w.float() if self.mode == _WIDEN else w

    def logits(self, start: int, stop: int, w: torch.Tensor) -> torch.Tensor:
        """Logits of columns [start, stop) as a contiguous [M, stop - start] view of the buffer."""
        if self.buffer is None:
            self.buffer = torch.empty(self.rows * self.chunk_size, dtype=self.logit_dtype, device=self.hidden.device)
        z = self.buffer[: self.rows * (stop - start)].view(self.rows, stop - start)
        b = None if self.bias is None else self.bias[start:stop]
        if self.mode == _FP32_OUT:
            torch.mm(self.hidden, w.t(), out_dtype=torch.float32, out=z)
            if b is not None:
                z.add_(b)
        elif b is None:
            torch.mm(self.hidden, w.t(), out=z)
        else:
            torch.addmm(b.float() if self.mode == _WIDEN else b, self.hidden, w.t(), out=z)
        return z

    def whole(self, w: torch.Tensor) -> torch.Tensor:
        """Logits of the whole vocabulary, contiguous fp32 [M, V] (the one-chunk CPU path)."""
        # oneDNN refuses an empty inner dimension (H = 0: the logits are the bias).
        if (self.hidden.device.type == "cpu" and self.mode in (_FP32, _WIDEN) and w.is_contiguous()
                and w.shape[1] > 0 and _onednn_linear_available()):
            # The bias must be contiguous: torch 2.13's op reads a strided bias as if it
            # were dense (wrong logits, no error). A [V] copy is cheap; the weight is not,
            # so a strided weight takes the MKL path instead.
            b = None if self.bias is None else self.bias.float().contiguous()
            return torch.ops.mkldnn._linear_pointwise(self.hidden, w, b, "none", [], "")
        return self.logits(0, w.shape[0], w)

    def grad_view(self, z: torch.Tensor) -> torch.Tensor:
        """Where the kernel writes dz: over z itself, or narrowed into z's bytes."""
        if self.mode != _FP32_OUT:
            return z
        # fp32 [M, n] seen as fp16/bf16 [M, 2n]; row i of dz is the first n
        # half-width elements of z's row i (the kernel reads a row before writing it).
        return z.view(self.hidden.dtype)[:, : z.shape[1]]


def _check_common(hidden, weight, bias, targets, label_smoothing, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden and weight must be 2-D, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must have the same dtype, got "
                        f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [M, H] and weight [V, H] disagree on H: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if targets.dtype != torch.int64 or tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets must be int64 [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    tensors = [hidden, weight, targets] + ([] if bias is None else [bias])
    if any(t.device != hidden.device for t in tensors):
        raise ValueError("hidden, weight, bias and targets must be on one device")
    if hidden.device.type not in ("cpu", "cuda"):
        raise ValueError(f"no compiled cross_entropy kernel for {hidden.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    reason = available(hidden.device.type, hidden.device if hidden.device.type == "cuda" else None)
    if reason is not None:
        raise RuntimeError(reason)


def _check_target_values(targets, vocab, ignore_index):
    # On CUDA this check would wait for the device; there an out-of-range
    # target instead leaves its row's target logit NaN, so the loss is NaN.
    if targets.device.type == "cpu" and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"got {targets[bad][0].item()}")


def cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                          z_loss: float = 0.0, chunk_size: int | None = None,
                          _mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss fp32 [M], lse fp32 [M]) of docs/ops.md mlm_cross_entropy.

    hidden [M, H] (any strides), weight [V, H], bias [V] or None (same float
    dtype), targets int64 [M]. `_mode` forces a logit buffer mode (tests).
    """
    _check_common(hidden, weight, bias, targets, label_smoothing, chunk_size)
    rows, vocab = hidden.shape[0], weight.shape[0]
    _check_target_values(targets, vocab, ignore_index)
    row_loss = torch.full((rows,), float("nan"), dtype=torch.float32, device=hidden.device)
    lse = torch.full((rows,), float("nan"), dtype=torch.float32, device=hidden.device)
    if rows == 0:
        return row_loss, lse
    mode = _mode or _pick_mode(hidden)
    chunk = _chunk_columns(vocab, rows, hidden.shape[1], chunk_size, mode)
    logits = _ChunkedLogits(hidden, weight, bias, mode, chunk)
    targets = targets.contiguous()
    # fp32 [M, 4]: running max, sum of exp(z - max), target logit, sum of z;
    # the first chunk's pass initialises it.
    state = torch.empty((rows, 4), dtype=torch.float32, device=hidden.device)
    device, stream = _ext.device_index(hidden), _ext.stream_handle(hidden)
    threads = _cpu_pass_threads()
    module = _ext.module()
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        z = logits.logits(start, stop, logits.weight_chunk(start, stop))
        module.cross_entropy_chunk_forward(
            z.data_ptr(), _ext.dtype_tag(z), z.stride(0), rows, stop - start, start, targets.data_ptr(),
            state.data_ptr(), start == 0, ignore_index, threads, device, stream)
    module.cross_entropy_finalize(
        state.data_ptr(), targets.data_ptr(), row_loss.data_ptr(), lse.data_ptr(), rows, vocab, ignore_index,
        float(label_smoothing), float(z_loss), device, stream)
    return row_loss, lse


def cross_entropy_backward(grad_row_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor, *,
                           ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                           chunk_size: int | None = None, _mode: str | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias or None) from grad_row_loss [M] and the forward's lse [M].

    dz_ij = g_i ((1 + 2 z_loss lse_i) softmax_ij - (1 - ls) [j = t_i] - ls / V), 0 on ignored rows.
    Gradients have the inputs' dtypes; d_hidden is contiguous.
    """
    _check_common(hidden, weight, bias, targets, label_smoothing, chunk_size)
    rows, width, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    for name, t in (("grad_row_loss", grad_row_loss), ("lse", lse)):
        if t.dim() != 1 or t.shape[0] != rows or not t.is_floating_point() or t.device != hidden.device:
            raise ValueError(f"{name} must be a float [{rows}] tensor on {hidden.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    _check_target_values(targets, vocab, ignore_index)
    dtype = hidden.dtype
    alloc = functools.partial(torch.full, fill_value=float("nan")) if _POISON_OUTPUTS else torch.empty
    d_weight = alloc((vocab, width), dtype=dtype, device=hidden.device)
    d_bias = None if bias is None else alloc((vocab,), dtype=dtype, device=hidden.device)
    if rows == 0:
        d_weight.zero_()
        if d_bias is not None:
            d_bias.zero_()
        return torch.zeros((0, width), dtype=dtype, device=hidden.device), d_weight, d_bias

    mode = _mode or _pick_mode(hidden)
    chunk = _chunk_columns(vocab, rows, hidden.shape[1], chunk_size, mode)
    logits = _ChunkedLogits(hidden, weight, bias, mode, chunk)
    targets = targets.contiguous()
    grad_row_loss = grad_row_loss.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    grads = _ChunkGradients(logits, d_weight, d_bias)
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        w = logits.weight_chunk(start, stop)
        z = logits.logits(start, stop, w)
        grads.add_chunk(z, w, start, stop, targets, lse, grad_row_loss, vocab, ignore_index, label_smoothing, z_loss)
    return grads.result()


class _ChunkGradients:
    """d_hidden, d_weight and d_bias accumulated chunk by chunk from dz written over a chunk's logits."""

    def __init__(self, logits: _ChunkedLogits, d_weight: torch.Tensor, d_bias: torch.Tensor | None):
        self.logits, self.d_weight, self.d_bias = logits, d_weight, d_bias
        rows, width = logits.rows, d_weight.shape[1]
        # fp32 accumulator of d_hidden over chunks (the output itself for fp32);
        # the first chunk writes it, later ones add to it.
        self.d_hidden = torch.empty((rows, width), dtype=torch.float32, device=d_weight.device)
        self.first = True
        self.partial = torch.empty_like(self.d_hidden) if logits.mode == _FP32_OUT else None
        self.ones = None

    def add_chunk(self, z, w, start, stop, targets, lse, grad_row_loss, vocab, ignore_index, label_smoothing,
                  z_loss) -> None:
        logits, mode, rows, dtype = self.logits, self.logits.mode, self.logits.rows, self.d_weight.dtype
        dz = logits.grad_view(z)
        _ext.module().cross_entropy_chunk_backward(
            z.data_ptr(), _ext.dtype_tag(z), z.stride(0), dz.data_ptr(), _ext.dtype_tag(dz), dz.stride(0),
            rows, stop - start, start, targets.data_ptr(), lse.data_ptr(), grad_row_loss.data_ptr(), vocab,
            ignore_index, float(label_smoothing), float(z_loss), _cpu_pass_threads(), _ext.device_index(z),
            _ext.stream_handle(z))
        if mode == _FP32_OUT:
            torch.mm(dz, w, out_dtype=torch.float32, out=self.d_hidden if self.first else self.partial)
            if not self.first:
                self.d_hidden.add_(self.partial)
        elif mode == _NATIVE:
            if self.first:
                self.d_hidden.copy_(torch.mm(dz, w))
            else:
                self.d_hidden.add_(torch.mm(dz, w))
        elif self.first:
            torch.mm(dz, w, out=self.d_hidden)
        else:
            self.d_hidden.addmm_(dz, w)
        self.first = False
        if mode == _WIDEN:
            self.d_weight[start:stop].copy_(torch.mm(dz.t(), logits.hidden))
        else:
            torch.mm(dz.t(), logits.hidden, out=self.d_weight[start:stop])
        if self.d_bias is not None:
            # A matrix-vector product, not dz.sum(0): BLAS reads dz once in
            # order (torch's column reduction took 16 ms against 0.06 ms for
            # [150, 3840] on the dev CPU), in a fixed order on both devices.
            if self.ones is None:
                self.ones = torch.ones(rows, dtype=dz.dtype, device=dz.device)
            if dz.dtype == dtype:
                torch.mv(dz.t(), self.ones, out=self.d_bias[start:stop])
            else:
                self.d_bias[start:stop].copy_(torch.mv(dz.t(), self.ones))

    def result(self):
        return self.d_hidden.to(self.d_weight.dtype), self.d_weight, self.d_bias


# On the CPU, up to this many bytes of logits, forward_backward computes the
# whole vocabulary in one chunk and writes dz over it at once: the logits are
# multiplied out once (3 matmuls) instead of twice (4), which is most of the
# time on a CPU. A BERT batch's ~150 masked rows at V = 30522 take 18 MiB. On
# a GPU the contract is stricter (no [M, V] buffer at all) and matmuls are
# cheap, so the CUDA path always streams.
_SINGLE_CHUNK_BUDGET_BYTES = 32 << 20


def fits_one_chunk(device_type: str, rows: int, vocab: int) -> bool:
    """Whether forward_backward multiplies the logits out once for this problem (CPU, small M x V)."""
    return device_type == "cpu" and rows * vocab * 4 <= _SINGLE_CHUNK_BUDGET_BYTES


def cross_entropy_forward_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor, *, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_size: int | None = None,
                                   grad_scale: float = 1.0,
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(row_loss, lse, d_hidden, d_weight, d_bias): the forward and the gradient of grad_scale * sum(row_loss).

    For a loss that is a fixed multiple of the summed row losses (mean or sum
    reduction) the gradient is known at forward time up to that factor;
    `grad_scale` applies a factor known now (1 / count for a mean) to dz, so
    the gradients need no later pass to scale them.
    """
    _check_common(hidden, weight, bias, targets, label_smoothing, chunk_size)
    rows, width, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    mode = _pick_mode(hidden)
    if rows == 0 or chunk_size is not None or not fits_one_chunk(hidden.device.type, rows, vocab):
        row_loss, lse = cross_entropy_forward(hidden, weight, bias, targets, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size)
        weights = torch.full((rows,), grad_scale, dtype=torch.float32, device=hidden.device)
        return (row_loss, lse, *cross_entropy_backward(weights, hidden, weight, bias, targets, lse,
                                                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                                                       z_loss=z_loss, chunk_size=chunk_size))
    _check_target_values(targets, vocab, ignore_index)
    logits = _ChunkedLogits(hidden, weight, bias, mode, vocab)
    targets = targets.contiguous()
    row_loss = torch.empty((rows,), dtype=torch.float32, device=hidden.device)
    lse = torch.empty((rows,), dtype=torch.float32, device=hidden.device)
    state = torch.empty((rows, 4), dtype=torch.float32, device=hidden.device)
    device, stream = _ext.device_index(hidden), _ext.stream_handle(hidden)
    module = _ext.module()
    w = logits.weight_chunk(0, vocab)
    z = logits.whole(w)
    module.cross_entropy_chunk_forward(
        z.data_ptr(), _ext.dtype_tag(z), z.stride(0), rows, vocab, 0, targets.data_ptr(), state.data_ptr(), True,
        ignore_index, _cpu_pass_threads(), device, stream)
    module.cross_entropy_finalize(
        state.data_ptr(), targets.data_ptr(), row_loss.data_ptr(), lse.data_ptr(), rows, vocab, ignore_index,
        float(label_smoothing), float(z_loss), device, stream)
    alloc = functools.partial(torch.full, fill_value=float("nan")) if _POISON_OUTPUTS else torch.empty
    d_weight = alloc((vocab, width), dtype=hidden.dtype, device=hidden.device)
    d_bias = None if bias is None else alloc((vocab,), dtype=hidden.dtype, device=hidden.device)
    grads = _ChunkGradients(logits, d_weight, d_bias)
    weights = torch.full((rows,), grad_scale, dtype=torch.float32, device=hidden.device)
    grads.add_chunk(z, w, 0, vocab, targets, lse, weights, vocab, ignore_index, label_smoothing, z_loss)
    return (row_loss, lse, *grads.result())
