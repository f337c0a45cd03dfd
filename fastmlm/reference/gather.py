"""Reference for `gather_rows` and its gradient."""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


def scatter_add_rows(grad: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum of `grad` rows into `num_rows` rows; fp32 accumulation for half types."""
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_rows, grad.shape[1], dtype=acc_dtype, device=grad.device)
    out.index_add_(0, index, grad.to(acc_dtype))
    return out.to(grad.dtype)
