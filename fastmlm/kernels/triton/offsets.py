"""When a tile's in-kernel offsets need 64 bits.

Triton multiplies `tl.arange`-based indices by runtime strides in int32 (a
stride that fits int32 is passed as an int32), so `rows * stride` wraps once
it reaches 2**31 elements: one 1M-token sequence of a [T, 16, 128] tensor, or
the k index of a transposed [262k, 8192] matrix. Kernels take a constexpr
switch, `widen(index, WIDE)`, and the launch wrappers set it only when the
largest offset a tile forms can reach 2**31, so the usual shapes keep the
int32 code that was measured and only the rare huge one compiles a variant.
The matrix kernels (cross-entropy, gathered GEMMs) need no variant: their
column index is the only int32 product, and `unit_column_stride` gives the
rare matrix whose column offsets could wrap a unit column stride instead.
"""
from __future__ import annotations

from typing import Iterable

import torch
import triton
import triton.language as tl

INT32_OFFSET_LIMIT = 2**31


def offsets_need_int64(terms: Iterable[tuple[int, int]]) -> bool:
    """Whether sum(largest index * |stride|) over (extent, stride) terms reaches 2**31.

    One term per int32 index of an address: (number of positions, stride), e.g.
    [(max_seqlen, stride_t), (head_dim, stride_d)] for a row of one sequence.
    """
    return sum(max(extent - 1, 0) * abs(stride) for extent, stride in terms) >= INT32_OFFSET_LIMIT


def unit_column_stride(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` [rows, columns], or a copy with column stride 1 if (columns - 1) x its
    column stride can reach 2**31 (a transposed [262k, 8192] matrix, say): the matrix
    kernels index columns in int32, and a unit stride is specialised away."""
    if offsets_need_int64([(matrix.shape[1], matrix.stride(1))]):
        return matrix.contiguous()
    return matrix


@triton.jit
def widen(index, WIDE: tl.constexpr):
    """`index` as int64 when WIDE (a compile-time switch), else unchanged."""
    if WIDE:
        index = index.to(tl.int64)
    return index
