"""Fused attention over packed variable-length sequences: launch wrappers.

`attention_forward` and `attention_backward` check shapes, dtypes and devices,
allocate outputs with `torch.empty` and launch the kernels of
`attention_fwd.py` and `attention_bwd.py`. Nothing here calls an aten matmul or
softmax or allocates a [seq, seq] tensor: all the arithmetic is in kernels.
Semantics: docs/ops.md, section `attention`.

Block sizes come from `config` if given, else from a small table keyed on the
head dim and dtype (GPU) or small fixed blocks (TRITON_INTERPRET=1).
Config keys: BLOCK_M (query rows per tile), BLOCK_N (key rows per tile),
num_warps, num_stages. Top-level keys apply to every kernel (forward, dK/dV,
dQ); a sub-dict under "fwd", "dkdv" or "dq" overrides them for that kernel
only, so one config dict can be passed to both wrappers.
"""
from __future__ import annotations

import math
import os

import torch
import triton

from fastmlm.kernels.triton.attention_bwd import (
    attention_backward_delta_kernel,
    attention_backward_dkdv_kernel,
    attention_backward_dq_kernel,
)
from fastmlm.kernels.triton.attention_fwd import attention_forward_kernel
from fastmlm.kernels.triton.launch_device import on_input_device
from fastmlm.kernels.triton.offsets import offsets_need_int64
from fastmlm.reference.random import seed_tensor, threshold24

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One sequence per grid row: CUDA's grid y dimension holds at most 65535.
MAX_SEQUENCES = 65535
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
KERNELS = ("fwd", "dkdv", "dq")
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _default_config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes for `kernel` in {"fwd", "dkdv", "dq"}.

    D <= 64: the best of a sweep on an H200 (bf16, D 64, 32 packed BERT
    sequences up to 512; `FASTMLM_ATTENTION_SWEEP=1 pytest benchmarks/test_attention.py`).
    64-row tiles beat 128-row ones there: packed sequences of a few hundred
    tokens give too few 128-row programs to fill the GPU's SMs. D > 64: the
    FlashAttention-2 shapes with 8 warps (correct, not tuned). fp32 (tests)
    halves the tiles: twice the bytes per element in shared memory.
    """
    if _interpreting():
        return dict(INTERPRETER_CONFIG)
    if head_dim <= 64:
        config = {"fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                  "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                  "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}}[kernel]
    else:
        config = {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
                  "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                  "dq": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}}[kernel]
    config = dict(config)
    if dtype == torch.float32:
        config["BLOCK_M"] = max(16, config["BLOCK_M"] // 2)
        config["BLOCK_N"] = max(16, config["BLOCK_N"] // 2)
        config["num_stages"] = 2
    return config


def _resolve_config(kernel: str, head_dim: int, dtype: torch.dtype, config: dict | None) -> dict:
    resolved = _default_config(kernel, head_dim, dtype)
    if config is None:
        return resolved
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    allowed = set(CONFIG_KEYS) | set(KERNELS)
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown attention config keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    resolved.update({key: config[key] for key in CONFIG_KEYS if key in config})
    if config.get(kernel) is not None:
        override = config[kernel]
        unknown = set(override) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown attention config keys {sorted(unknown)} under {kernel!r}")
        resolved.update(override)
    for key in ("BLOCK_M", "BLOCK_N"):
        value = resolved[key]
        if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
            raise ValueError(f"config {key} must be a power of two >= 16 (tl.dot tiles), got {value!r}")
    return resolved


def _check_device(tensor: torch.Tensor, name: str) -> None:
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and _interpreting():
        return
    raise ValueError(
        f"{name} is on {tensor.device}: the Triton attention kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, dropout_p) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {tensor.dtype} not supported; use float16, bfloat16 or float32")
        _check_device(tensor, name)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q [Tq, heads, D] {tuple(q.shape)} and k [Tk, heads, D] {tuple(k.shape)} "
                         "must agree on heads and D")
    head_dim = q.shape[2]
    if head_dim % 8 != 0 or not 8 <= head_dim <= 128:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, 128], got {head_dim}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor [batch + 1], got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if cu_seqlens_q.numel() - 1 > MAX_SEQUENCES:
        raise ValueError(f"{cu_seqlens_q.numel() - 1} sequences: the kernels' grid holds at most {MAX_SEQUENCES} "
                         "(split the batch, or use another attention backend)")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")


def _dropout_args(dropout_p: float, seed, unused_pointer: torch.Tensor):
    """(enabled, 1/(1-p), seed pointer, threshold24(p)); p = 1 drops all, scale 0.

    Without dropout the kernels never read the seed, so no tensor is made for
    it and `unused_pointer` fills the argument.
    """
    drop_threshold = threshold24(float(dropout_p))
    enabled = drop_threshold > 0
    dropout_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    seed_pointer = seed_tensor(seed, unused_pointer.device) if enabled else unused_pointer
    return enabled, dropout_scale, seed_pointer, drop_threshold


def _block_d(head_dim: int) -> int:
    # tl.dot needs an inner dimension of at least 16; features past head_dim are masked.
    return max(16, triton.next_power_of_2(head_dim))


def _wide_rows(max_seqlen_q: int, max_seqlen_k: int, query_side, key_side) -> bool:
    """Whether a row offset within a sequence (row x row stride + feature x feature stride)
    can reach 2**31 in any of these [tokens, heads, D] tensors: the kernels then compute
    those offsets in int64 (a compiled variant of its own; offsets.py)."""
    return any(offsets_need_int64([(rows, t.stride(0)), (t.shape[2], t.stride(2))])
               for rows, tensors in ((max_seqlen_q, query_side), (max_seqlen_k, key_side)) for t in tensors)


def _dot_precision(dtype: torch.dtype):
    # fp32 inputs are for testing: full fp32 products, not TF32.
    return "ieee" if dtype == torch.float32 else None


@on_input_device
def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                      causal: bool, softmax_scale: float, dropout_p: float, seed: int | torch.Tensor,
                      config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences; returns (out [Tq, heads, D] in q's dtype, lse fp32 [heads, Tq]).

    q [Tq, heads, D], k/v [Tk, heads, D] with any strides; cu_seqlens_q/k int32
    [batch + 1]; max_seqlen_q/k bound each sequence's length (they size the
    grid, the kernels read the true lengths). `seed`: an int or a 0-d int64
    tensor on q's device (or the CPU), read by the kernels only when dropout
    is on. See docs/ops.md `attention`.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, dropout_p)
    # The kernels read the offsets with unit stride (a copy of batch + 1 ints if strided).
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    num_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty((num_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, num_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    cfg = _resolve_config("fwd", head_dim, q.dtype, config)
    enabled, dropout_scale, seed_pointer, drop_threshold = _dropout_args(dropout_p, seed, cu_seqlens_q)
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, heads)
    attention_forward_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
        float(softmax_scale) * LOG2E, dropout_scale, seed_pointer, drop_threshold,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CAUSAL=bool(causal), DROPOUT=enabled,
        DOT_PRECISION=_dot_precision(q.dtype), WIDE_ROWS=_wide_rows(max_seqlen_q, max_seqlen_k, (q, out), (k, v)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


@on_input_device
def attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                       max_seqlen_k: int, *, causal: bool, softmax_scale: float, dropout_p: float,
                       seed: int | torch.Tensor, config: dict | None = None):
    """Gradients (dq, dk, dv) of `attention_forward`, same shapes and dtypes as q, k, v.

    `out` and `lse` are the forward's results; dropout is remade from `seed`.
    Deterministic: every gradient element is written by one program, no atomics.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, dropout_p)
    # The kernels read the offsets with unit stride (a copy of batch + 1 ints if strided).
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != q.shape or tensor.device != q.device:
            raise ValueError(f"{name} must match q's shape {tuple(q.shape)} and device {q.device}")
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from q's {q.dtype}")
    num_q, heads, head_dim = q.shape
    if not isinstance(lse, torch.Tensor) or lse.shape != (heads, num_q) or lse.dtype != torch.float32 \
            or lse.device != q.device:
        raise ValueError(f"lse must be float32 [heads, Tq] = [{heads}, {num_q}] on {q.device}, got "
                         f"{getattr(lse, 'dtype', None)} {tuple(getattr(lse, 'shape', ()))}")
    if num_q > 1 and lse.stride(1) != 1:
        raise ValueError("lse must have token stride 1 (as attention_forward returns it)")
    batch = cu_seqlens_q.numel() - 1
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or heads == 0:
        return dq, dk, dv
    block_d = _block_d(head_dim)
    enabled, dropout_scale, seed_pointer, drop_threshold = _dropout_args(dropout_p, seed, cu_seqlens_q)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=bool(causal), DROPOUT=enabled,
                  DOT_PRECISION=_dot_precision(q.dtype),
                  WIDE_ROWS=_wide_rows(max_seqlen_q, max_seqlen_k, (q, grad_out, dq), (k, v, dk, dv)))
    scalars = (float(softmax_scale), float(softmax_scale) * LOG2E, dropout_scale, seed_pointer, drop_threshold)

    delta = torch.empty((heads, num_q), dtype=torch.float32, device=q.device)
    if num_q > 0:
        block_t = 16 if _interpreting() else 64
        attention_backward_delta_kernel[(triton.cdiv(num_q, block_t), heads)](
            out, grad_out, delta, num_q, *out.stride(), *grad_out.stride(), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t)

    if max_seqlen_k > 0 and k.shape[0] > 0:
        cfg = _resolve_config("dkdv", head_dim, q.dtype, config)
        grid = (triton.cdiv(max_seqlen_k, cfg["BLOCK_N"]), batch, heads)
        attention_backward_dkdv_kernel[grid](
            q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            lse.stride(0), delta.stride(0), *scalars,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **common)
    if max_seqlen_q > 0 and num_q > 0:
        cfg = _resolve_config("dq", head_dim, q.dtype, config)
        grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, heads)
        attention_backward_dq_kernel[grid](
            q, k, v, grad_out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            lse.stride(0), delta.stride(0), *scalars,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **common)
    return dq, dk, dv
