"""Reference for `mlm_head` (docs/ops.md): BERT's MLM head and loss on the rows `index`.

    x = hidden_all[index]
    x = gelu_erf(x @ dense_weight.T + dense_bias)
    x = layer_norm(x, eps)
    (row_loss, lse) = mlm_cross_entropy reference on x

Computed in the compute dtype (fp32, or fp64 for fp64 inputs), with the transformed
rows rounded to the input dtype before the decoder, as a model running in that dtype
would. Differentiable: the `torch` backend's backward re-runs this under autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastmlm.reference.cross_entropy import compute_dtype, cross_entropy_forward


def head_transform(hidden_all: torch.Tensor, index: torch.Tensor, dense_weight: torch.Tensor,
                   dense_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                   layer_norm_eps: float) -> torch.Tensor:
    """The transformed masked rows [M, H], in hidden_all's dtype."""
    dtype = compute_dtype(hidden_all.dtype)
    x = hidden_all[index.long()].to(dtype)
    x = F.gelu(x @ dense_weight.to(dtype).T + dense_bias.to(dtype), approximate="none")
    x = F.layer_norm(x, (x.shape[-1],), norm_weight.to(dtype), norm_bias.to(dtype), layer_norm_eps)
    return x.to(hidden_all.dtype)


def mlm_head_forward(hidden_all: torch.Tensor, index: torch.Tensor, dense_weight: torch.Tensor,
                     dense_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                     decoder_weight: torch.Tensor, decoder_bias: Optional[torch.Tensor],
                     targets: torch.Tensor, *, layer_norm_eps: float, ignore_index: int,
                     label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss [M], lse [M]) in the compute dtype."""
    x = head_transform(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                       layer_norm_eps)
    return cross_entropy_forward(x, decoder_weight, decoder_bias, targets, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, z_loss=z_loss)


def mlm_head_forward_saved(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                           decoder_weight, decoder_bias, targets, *, layer_norm_eps: float,
                           ignore_index: int, label_smoothing: float, z_loss: float):
    """The forward custom op's outputs: (row_loss, lse, pre, act, normed, ln_mean, ln_rstd).

    pre = dense output before GELU, act = after it, normed = LayerNorm output (all [M, H]
    in hidden_all's dtype, what a fused backward reads); ln_mean, ln_rstd [M] in the
    compute dtype. The losses equal `mlm_head_forward`'s up to the rounding of pre and
    act to the input dtype (none for fp32/fp64), which the Triton kernels share.
    """
    dtype = compute_dtype(hidden_all.dtype)
    x = hidden_all[index.long()].to(dtype)
    pre = (x @ dense_weight.to(dtype).T + dense_bias.to(dtype)).to(hidden_all.dtype)
    act = F.gelu(pre.to(dtype), approximate="none").to(hidden_all.dtype)
    act_c = act.to(dtype)
    ln_mean = act_c.mean(dim=-1)
    # The biased variance written out: var() warns on an empty selection ([0, H]).
    ln_rstd = torch.rsqrt((act_c - ln_mean[:, None]).square().mean(dim=-1) + layer_norm_eps)
    normed = ((act_c - ln_mean[:, None]) * ln_rstd[:, None] * norm_weight.to(dtype)
              + norm_bias.to(dtype)).to(hidden_all.dtype)
    row_loss, lse = cross_entropy_forward(normed, decoder_weight, decoder_bias, targets,
                                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                                          z_loss=z_loss)
    return row_loss, lse, pre, act, normed, ln_mean, ln_rstd
