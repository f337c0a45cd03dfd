"""Reference for `mlm_cross_entropy`: dense logits, the readable specification.

Row loss for a target t (docs/ops.md):
    (1 - ls) * (lse - z_t) + ls * (lse - mean_j z_j) + z_loss * lse**2
and 0 for ignored rows. The backward is written out rather than left to
autograd so that it states the formula every kernel implements.
"""
from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (the tests' ground truth); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    dtype = compute_dtype(hidden.dtype)
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss [M], lse [M]) in the compute dtype."""
    z = logits(hidden, weight, bias)
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    target_logit = z.gather(1, torch.where(valid, targets, 0).view(-1, 1)).view(-1)
    loss = (1.0 - label_smoothing) * (lse - target_logit)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0), lse


def cross_entropy_backward(
    grad_row_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(d_hidden, d_weight, d_bias) in the input dtypes."""
    dtype = compute_dtype(hidden.dtype)
    z = logits(hidden, weight, bias)
    vocab = z.shape[1]
    valid = targets != ignore_index
    g = torch.where(valid, grad_row_loss.to(dtype), 0.0)
    lse = lse.to(dtype)
    softmax = torch.exp(z - lse.view(-1, 1))
    dz = (1.0 + 2.0 * z_loss * lse).view(-1, 1) * softmax - label_smoothing / vocab
    onehot = torch.zeros_like(dz).scatter_(1, torch.where(valid, targets, 0).view(-1, 1), 1.0)
    dz = g.view(-1, 1) * (dz - (1.0 - label_smoothing) * onehot)
    d_hidden = (dz @ weight.to(dtype)).to(hidden.dtype)
    d_weight = (dz.T @ hidden.to(dtype)).to(weight.dtype)
    d_bias = None if bias is None else dz.sum(dim=0).to(bias.dtype)
    return d_hidden, d_weight, d_bias
