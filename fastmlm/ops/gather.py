"""`gather_rows`: x[index] for a 2-D x, with a scatter-add gradient.

Backends: `cuda`, `cpu` (fastmlm._C) and `torch`. The gradient is
deterministic whenever `torch.are_deterministic_algorithms_enabled()`.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm.ops.checks import FLOAT_DTYPES, INDEX_DTYPES, REFERENCE_FLOAT_DTYPES, check_index_range, check_same_device, check_tensor
from fastmlm.ops.dispatch import Backend, BackendTable, call_device, compiled_why_not, dtype_why_not
from fastmlm.reference import gather as reference

GATHER_ROWS = BackendTable("gather_rows")


def _compiled_on(device: str):
    def why_not(device_type: str, rows: torch.Tensor, *args) -> Optional[str]:
        if device_type != device:
            return f"serves {device} tensors, not {device_type}"
        return (compiled_why_not(device_type, "gather", call_device(device_type, rows))
                or dtype_why_not(rows.dtype, FLOAT_DTYPES))

    return why_not


def _compiled_forward(x, index):
    from fastmlm.kernels.compiled import gather

    return gather.gather_rows(x, index)


def _compiled_backward(grad, index, num_rows):
    from fastmlm.kernels.compiled import gather

    return gather.scatter_add_rows(grad, index, num_rows, deterministic=torch.are_deterministic_algorithms_enabled())


for _device in ("cuda", "cpu"):
    GATHER_ROWS.register(Backend(_device, _compiled_on(_device), _compiled_forward, _compiled_backward))
GATHER_ROWS.register(Backend("torch", lambda *a: None, reference.gather_rows, reference.scatter_add_rows))


@torch.library.custom_op("fastmlm::gather_rows", mutates_args=())
def _gather_rows_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return GATHER_ROWS.choose(x.device.type, x, index).forward(x, index)


@_gather_rows_op.register_fake
def _(x, index):
    return x.new_empty(index.shape[0], x.shape[1])


@torch.library.custom_op("fastmlm::gather_rows_backward", mutates_args=())
def _gather_rows_backward_op(grad: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    return GATHER_ROWS.choose(grad.device.type, grad, index).backward(grad, index, num_rows)


@_gather_rows_backward_op.register_fake
def _(grad, index, num_rows):
    return grad.new_empty(num_rows, grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.num_rows = x.shape[0]


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _gather_rows_backward_op(grad.contiguous(), index, ctx.num_rows), None


_gather_rows_op.register_autograd(_backward, setup_context=_setup_context)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for x `[N, D]` and index int32/int64 `[M]` in [0, N)."""
    check_tensor("x", x, ndim=2, dtypes=REFERENCE_FLOAT_DTYPES)
    check_tensor("index", index, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device(x=x, index=index)
    check_index_range("index", index, x.shape[0])
    return _gather_rows_op(x, index)
