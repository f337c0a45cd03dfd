"""Fused BERT MLM head + loss on the masked rows only (docs/ops.md `mlm_head`).

Forward:  pre = hidden_all[index] @ dense_weight.T + dense_bias   (gathered GEMM,
          act = gelu_erf(pre)                                       GELU in its epilogue)
          normed, mean, rstd = layer_norm(act)
          row_loss, lse = streamed cross-entropy(normed, decoder_weight, decoder_bias)
Backward: CE backward -> (LayerNorm + GELU) backward -> dense backward, whose input
gradient is scattered into zeros [N, H] through `index`.

Saved for backward: pre, act, normed ([M, H] each, M = masked rows), mean, rstd, lse
([M]); the [M, V] logits are recomputed tile by tile, never stored.
"""
import torch

from fastmlm.kernels.triton.cross_entropy import (check_inputs, cross_entropy_backward,
                                                  cross_entropy_forward)
from fastmlm.kernels.triton.launch_device import on_input_device
from fastmlm.kernels.triton.layer_norm import gelu_layer_norm_backward, layer_norm_forward
from fastmlm.kernels.triton.matmul_gather import (gather_linear_gelu, gather_linear_weight_grad,
                                                  linear_input_grad_scatter)


def check_head_inputs(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                      decoder_weight, decoder_bias, targets):
    """Metadata checks before any launch; returns (N, M, H, V)."""
    if hidden_all.dim() != 2:
        raise ValueError(f"hidden_all must be [N, H], got {tuple(hidden_all.shape)}")
    N, H = hidden_all.shape
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be int32/int64 [M], got {index.dtype} {tuple(index.shape)}")
    M = index.shape[0]
    for name, t, shape in (("dense_weight", dense_weight, (H, H)), ("dense_bias", dense_bias, (H,)),
                           ("norm_weight", norm_weight, (H,)), ("norm_bias", norm_bias, (H,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
        if t.dtype != hidden_all.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from hidden_all's {hidden_all.dtype}")
        if t.device != hidden_all.device:
            raise ValueError(f"{name} is on {t.device}, hidden_all on {hidden_all.device}")
    if index.device != hidden_all.device:
        raise ValueError(f"index is on {index.device}, hidden_all on {hidden_all.device}")
    # The decoder part has the cross-entropy's own checks (a [M, H] meta stand-in for normed).
    normed_meta = torch.empty((M, H), dtype=hidden_all.dtype, device="meta")
    check_inputs(normed_meta, decoder_weight.to("meta"),
                 None if decoder_bias is None else decoder_bias.to("meta"), targets.to("meta"))
    for name, t in (("decoder_weight", decoder_weight), ("decoder_bias", decoder_bias), ("targets", targets)):
        if t is not None and t.device != hidden_all.device:
            raise ValueError(f"{name} is on {t.device}, hidden_all on {hidden_all.device}")
    if hidden_all.device.type != "cuda":
        check_inputs(hidden_all[:0], decoder_weight, decoder_bias, targets[:0])  # interpreter gate
    return N, M, H, decoder_weight.shape[0]


@on_input_device
def mlm_head_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                     decoder_weight, decoder_bias, targets, *, layer_norm_eps, ignore_index,
                     label_smoothing, z_loss, config=None):
    """Returns (row_loss fp32 [M], lse fp32 [M], pre, act, normed [M, H], mean, rstd fp32 [M])."""
    check_head_inputs(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                      decoder_weight, decoder_bias, targets)
    pre, act = gather_linear_gelu(hidden_all, index, dense_weight, dense_bias)
    normed, mean, rstd = layer_norm_forward(act, norm_weight, norm_bias, layer_norm_eps)
    row_loss, lse = cross_entropy_forward(normed, decoder_weight, decoder_bias, targets,
                                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                                          z_loss=z_loss, config=config)
    return row_loss, lse, pre, act, normed, mean, rstd


@on_input_device
def mlm_head_backward(grad_row_loss, hidden_all, index, dense_weight, norm_weight,
                      decoder_weight, decoder_bias, targets, pre, act, normed, mean, rstd, lse, *,
                      ignore_index, label_smoothing, z_loss, deterministic=False, config=None):
    """Returns (d_hidden_all [N, H], d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias,
    d_decoder_weight, d_decoder_bias or None), each in its input's dtype."""
    d_normed, d_decoder_weight, d_decoder_bias = cross_entropy_backward(
        grad_row_loss, normed, decoder_weight, decoder_bias, targets, lse,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        deterministic=deterministic, config=config)
    d_pre, d_norm_weight, d_norm_bias = gelu_layer_norm_backward(d_normed, pre, act, mean, rstd,
                                                                 norm_weight)
    d_dense_weight, d_dense_bias = gather_linear_weight_grad(d_pre, hidden_all, index)
    d_hidden_all = linear_input_grad_scatter(d_pre, dense_weight, index, hidden_all.shape[0],
                                             deterministic=deterministic)
    return (d_hidden_all, d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias,
            d_decoder_weight, d_decoder_bias)
