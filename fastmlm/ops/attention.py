"""`attention`: softmax attention within each sequence of a packed batch.

Backends: `triton` (fused FlashAttention-style kernels, GPU), `sdpa`
(PyTorch's fused CPU kernel on a padded view) and `torch` (the reference).
The forward op returns `(out, lse)`; every backend's backward works from
those, so forward and backward may be served by different backends.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastmlm.ops.checks import FLOAT_DTYPES, REFERENCE_FLOAT_DTYPES, check_same_device, check_tensor, value_checks_enabled
from fastmlm.ops.dispatch import (Backend, BackendTable, call_device, dtype_why_not, recompute_backward,
                                   triton_why_not)
from fastmlm.ops.registration import register_autocast
from fastmlm.reference import attention as reference
from fastmlm.reference.random import seed_tensor

ATTENTION = BackendTable("attention")
MAX_HEAD_DIM = 128


# The kernels put one sequence per grid row (CUDA's y dimension), which holds at most 65535;
# fastmlm.kernels.triton.attention.MAX_SEQUENCES, not imported here: that module needs triton.
MAX_TRITON_SEQUENCES = 65535


def _triton_why_not(device_type, q, k, v, cu_q, *args) -> Optional[str]:
    reason = triton_why_not(device_type, call_device(device_type, q)) or dtype_why_not(q.dtype, FLOAT_DTYPES)
    if reason is None and (q.shape[-1] % 8 or q.shape[-1] > MAX_HEAD_DIM):
        reason = f"head dim {q.shape[-1]} is not a multiple of 8 up to {MAX_HEAD_DIM}"
    if reason is None and cu_q.shape[0] - 1 > MAX_TRITON_SEQUENCES:
        reason = f"{cu_q.shape[0] - 1} sequences: the kernels' grid holds at most {MAX_TRITON_SEQUENCES}"
    return reason


def _sdpa_why_not(device_type, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed) -> Optional[str]:
    if device_type != "cpu":
        return "the sdpa backend wraps PyTorch's CPU flash kernel, which needs CPU tensors"
    if dropout_p > 0.0:
        return "sdpa draws dropout from torch's generator, not fastmlm's counter hash"
    return dtype_why_not(q.dtype, FLOAT_DTYPES)


def _triton_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    from fastmlm.kernels.triton import attention as kernel

    return kernel.attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale,
                                    dropout_p=dropout_p, seed=seed)


def _triton_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    from fastmlm.kernels.triton import attention as kernel

    return kernel.attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal,
                                     softmax_scale=scale, dropout_p=dropout_p, seed=seed)


def _sdpa_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    from fastmlm.kernels import sdpa

    return sdpa.attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale)


def _sdpa_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    from fastmlm.kernels import sdpa

    return sdpa.attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal,
                                   softmax_scale=scale)


def _reference_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    return reference.attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale,
                                       dropout_p=dropout_p, seed=seed)


def _reference_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
    def forward(q_, k_, v_):
        return _reference_forward(q_, k_, v_, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed)[0]

    return tuple(recompute_backward(forward, [q, k, v], [True, True, True], [grad_out]))


ATTENTION.register(Backend("triton", _triton_why_not, _triton_forward, _triton_backward))
ATTENTION.register(Backend("sdpa", _sdpa_why_not, _sdpa_forward, _sdpa_backward))
ATTENTION.register(Backend("torch", lambda *a: None, _reference_forward, _reference_backward))


@torch.library.custom_op("fastmlm::attention", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                softmax_scale: float, dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, seed)
    out, lse = ATTENTION.choose(q.device.type, *args).forward(*args)
    # Contiguous whatever the backend or the inputs' strides, as the fake promises
    # (Inductor lays out its buffers from the fake and checks the real strides).
    return out.contiguous(), lse.contiguous()


@_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, seed):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype)


@torch.library.custom_op("fastmlm::attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                 max_seqlen_k: int, causal: bool, softmax_scale: float, dropout_p: float,
                 seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    forward_args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, seed)
    backend = ATTENTION.choose(q.device.type, *forward_args)
    grads = backend.backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, softmax_scale, dropout_p, seed)
    return tuple(g.contiguous() for g in grads)  # as the fake says, for any input strides


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, *args):
    # Contiguous, not empty_like: q, k, v may be strided views (of a fused projection, say).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed = inputs
    out, lse = output
    # The seed is saved, not redrawn: backward remakes the forward's dropout mask from it.
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.options = (max_q, max_k, causal, scale, dropout_p)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.options, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_forward_op)


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 entries (one sequence), got {cu.shape[0]}")
    if not value_checks_enabled(cu):
        return
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the total number of rows {total}, got {values[0]}..{values[-1]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"a sequence in {name} has {max(lengths)} rows, more than max_seqlen={max_seqlen}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_k: Optional[int] = None,
) -> torch.Tensor:
    """Attention within each packed sequence: `[Tq, heads, D]` in, `[Tq, heads, D]` out.

    Sequence b is rows `cu_seqlens[b]:cu_seqlens[b+1]` of q (and of
    `cu_seqlens_k`'s rows of k and v, by default the same). See docs/ops.md for
    causal alignment and the dropout rule. `seed` is an int or a 0-d int64
    tensor (on q's device or the CPU); a device tensor, such as one drawn with
    `torch.randint(..., device=q.device)` per step, keeps a compiled or
    CUDA-graph-captured step free of host reads and gives fresh masks per replay.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=REFERENCE_FLOAT_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError("k has a different number of rows than q: pass cu_seqlens_k")
        cu_seqlens_k = cu_seqlens
        max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    elif max_seqlen_k is None:
        raise ValueError("cu_seqlens_k needs max_seqlen_k")
    _check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], max_seqlen)
    if cu_seqlens_k is not cu_seqlens or max_seqlen_k != max_seqlen or k.shape[0] != q.shape[0]:
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)  # else just checked
    if cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens has {cu_seqlens.shape[0]} entries, cu_seqlens_k {cu_seqlens_k.shape[0]}")
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and abs(scale) <= torch.finfo(torch.float32).max):
        raise ValueError(f"softmax_scale must be finite in float32, got {softmax_scale}")
    out, _ = _forward_op(q, k, v, cu_seqlens, cu_seqlens_k, int(max_seqlen), int(max_seqlen_k), bool(causal), scale,
                         float(dropout_p), seed_tensor(seed, q.device))
    return out
