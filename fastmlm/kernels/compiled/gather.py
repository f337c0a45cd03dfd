"""gather_rows and scatter_add_rows on the compiled backends (`cpu`, `cuda`).

Semantics: docs/ops.md; reference: fastmlm/reference/gather.py. Kernels:
csrc/cpu/gather.cpp, csrc/cuda/gather.cu (argument structs in
csrc/common/gather.h).

- gather_rows copies whole rows as bytes (16-byte vector words on CUDA when
  the rows are 16-byte aligned), so it is exact for every float dtype.
- scatter_add_rows accumulates in fp32 and rounds once to the output dtype.
  CPU: always a fixed summation order (increasing position in the index).
  CUDA: fp32 atomics, or with `deterministic` a stable torch sort of the index
  on the device and one thread per (output row, column) summing its run in
  sorted order: no atomics, and bit-identical to the CPU kernel.
The index range ([0, N)) is checked by the op layer before these run; with value
checks off an index outside it gives a NaN row (gather) or is dropped (scatter).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm import _ext

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def available(device_type: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why these kernels cannot serve tensors of `device_type` (on `device`), or None."""
    return _ext.unavailable_reason(device_type, device)


def _check_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """A 2-D float tensor with unit column stride (copied only if the columns are strided)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, width], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        t = t.contiguous()
    return t


def _row_stride(t: torch.Tensor) -> int:
    # A single row's stride is meaningless (and may be anything): use the width.
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _check_index(index: torch.Tensor, device: torch.device, length: Optional[int] = None) -> torch.Tensor:
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if index.device != device:
        raise ValueError(f"index is on {index.device}, rows on {device}")
    if length is not None and index.shape[0] != length:
        raise ValueError(f"index has {index.shape[0]} entries, grad_out {length} rows")
    return index.contiguous()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]`: x `[N, D]` float (any row stride), index int32/int64 `[M]` -> contiguous `[M, D]`."""
    x = _check_rows("x", x)
    index = _check_index(index, x.device)
    C = _ext.require(x.device)
    out = torch.empty((index.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    C.gather_rows(
        x=x.data_ptr(),
        x_row_stride=_row_stride(x),
        dtype=_ext.dtype_tag(x),
        index=index.data_ptr(),
        index_dtype=_ext.dtype_tag(index),
        out=out.data_ptr(),
        num_index=index.shape[0],
        width=x.shape[1],
        num_rows=x.shape[0],
        **_ext.launch_args(x),
    )
    return out


def scatter_add_rows(grad_out: torch.Tensor, index: torch.Tensor, num_rows: int, *, deterministic: bool) -> torch.Tensor:
    """grad_x `[num_rows, D]` = zeros, then `grad_x[index[m]] += grad_out[m]` (fp32 accumulation).

    `deterministic` forbids atomics on CUDA (the CPU kernel is always
    deterministic). Returns grad_out's dtype, contiguous.
    """
    grad_out = _check_rows("grad_out", grad_out)
    index = _check_index(index, grad_out.device, grad_out.shape[0])
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    C = _ext.require(grad_out.device)
    num_index, width = grad_out.shape
    grad_x = torch.empty((num_rows, width), dtype=grad_out.dtype, device=grad_out.device)
    if grad_x.numel() == 0:
        return grad_x
    common = dict(
        grad_out_row_stride=_row_stride(grad_out),
        dtype=_ext.dtype_tag(grad_out),
        index_dtype=_ext.dtype_tag(index),
        grad_x=grad_x.data_ptr(),
        num_index=num_index,
        num_rows=num_rows,
        width=width,
        **_ext.launch_args(grad_out),
    )
    if grad_out.device.type == "cuda" and deterministic:
        # Stable: equal indices keep increasing m, the CPU kernel's order.
        sorted_index, order = torch.sort(index, stable=True)
        C.scatter_add_rows_sorted(grad_out=_ext.data_ptr(grad_out), sorted_index=_ext.data_ptr(sorted_index),
                                  order=_ext.data_ptr(order), **common)
        return grad_x
    accumulator = None
    if grad_out.device.type == "cuda" and grad_out.dtype != torch.float32:
        accumulator = torch.empty((num_rows, width), dtype=torch.float32, device=grad_out.device)
    C.scatter_add_rows(grad_out=_ext.data_ptr(grad_out), index=_ext.data_ptr(index),
                       accumulator=_ext.data_ptr(accumulator), **common)
    return grad_x
