"""mlm_head on the compiled backends (`cpu`, `cuda`): BERT's MLM head and loss on
the masked rows only, without [M, V] logits (semantics: docs/ops.md `mlm_head`).

Forward:  x      = hidden_all[index]                      [M, H]   torch index_select
          pre    = x @ dense_weight.T + dense_bias                  torch addmm
          act    = gelu_erf(pre)
          normed = layer_norm(act) (mean, rstd saved)
          row_loss, lse = streamed cross-entropy(normed, decoder)   compiled (cross_entropy.py)
Backward: d_normed, d_decoder_weight, d_decoder_bias from the streamed cross-entropy
          backward; then, from the saved tensors, LayerNorm and GELU backward (aten's
          fused backward kernels, called directly) and the dense backward (two matmuls
          and a matrix-vector product); d_hidden_all = zeros [N, H] with d_x added at
          rows `index` (compiled scatter_add_rows: fp32 accumulation, deterministic on
          request).
Forward+backward (`mlm_head_forward_backward`, for mean/sum reductions): the forward and
          the gradients of sum(row_loss) in one call, through the cross-entropy's
          `cross_entropy_forward_backward` (on the CPU at small M: logits multiplied out
          once instead of again in a backward).

The [M, H] part is plain torch ops: M is ~15% of the tokens and H x H is small, so
MKL / cuBLAS does it fast, and the vocabulary projection (M x H x V, ~97% of the
flops at bert-base sizes) goes through the compiled cross-entropy, whose only
extra memory is one [M, chunk] logits buffer. Custom op bodies run with autograd
excluded, so the backward calls the gradient kernels itself.

Precision: the [M, H] part computes in fp32 for every input dtype; pre, act and
normed are rounded to the input dtype as they are saved (and the next step reads
the rounded values), exactly as the reference `mlm_head_forward_saved` and the
Triton kernels do, so every backend's saved tensors are interchangeable.
Gradients are accumulated in fp32 and returned in the input dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm.kernels.compiled import cross_entropy as ce
from fastmlm.kernels.compiled.gather import scatter_add_rows

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def available(device_type: str, device: Optional[torch.device] = None) -> Optional[str]:
    """None if these kernels can run on `device_type` tensors on `device`, else why not."""
    return ce.available(device_type, device)


def check_head_inputs(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, targets) -> None:
    """Shape, dtype and device checks of the [M, H] part (the cross-entropy checks the decoder part)."""
    if hidden_all.dim() != 2:
        raise ValueError(f"hidden_all must be [N, H], got shape {tuple(hidden_all.shape)}")
    if hidden_all.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden_all must be float32, float16 or bfloat16, got {hidden_all.dtype}")
    width = hidden_all.shape[1]
    if index.dim() != 1 or index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"index must be int32/int64 [M], got {index.dtype} {tuple(index.shape)}")
    if targets.dim() != 1 or targets.shape[0] != index.shape[0]:
        raise ValueError(f"targets must be [{index.shape[0]}] (one per index entry), got {tuple(targets.shape)}")
    for name, t, shape in (("dense_weight", dense_weight, (width, width)), ("dense_bias", dense_bias, (width,)),
                           ("norm_weight", norm_weight, (width,)), ("norm_bias", norm_bias, (width,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
        if t.dtype != hidden_all.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from hidden_all's {hidden_all.dtype}")
    if decoder_weight.dim() != 2 or decoder_weight.shape[1] != width:
        raise ValueError(f"decoder_weight must be [V, {width}], got {list(decoder_weight.shape)}")
    for name, t in (("index", index), ("dense_weight", dense_weight), ("dense_bias", dense_bias),
                    ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("decoder_weight", decoder_weight),
                    ("decoder_bias", decoder_bias), ("targets", targets)):
        if t is not None and t.device != hidden_all.device:
            raise ValueError(f"{name} is on {t.device}, hidden_all on {hidden_all.device}")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # A no-op for fp32 tensors: no copy of the weights on the fp32 path.
    return t.float()


def _transform_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, layer_norm_eps):
    """(pre, act, normed [M, H] in hidden_all's dtype, ln_mean, ln_rstd fp32 [M])."""
    dtype, width = hidden_all.dtype, hidden_all.shape[1]
    x = _fp32(hidden_all.index_select(0, index))
    pre = torch.addmm(_fp32(dense_bias), x, _fp32(dense_weight).t()).to(dtype)
    # GELU and LayerNorm read the rounded pre and act (no-ops for fp32), as the reference does.
    act = torch.nn.functional.gelu(_fp32(pre), approximate="none").to(dtype)
    # ln_rstd = 1 / sqrt(biased variance + eps), the reference's definition.
    normed, ln_mean, ln_rstd = torch.native_layer_norm(_fp32(act), (width,), _fp32(norm_weight), _fp32(norm_bias),
                                                       layer_norm_eps)
    return pre, act, normed.to(dtype), ln_mean.view(-1), ln_rstd.view(-1)


def _transform_backward(d_normed, hidden_all, index, dense_weight, norm_weight, norm_bias, pre, act, ln_mean,
                        ln_rstd, deterministic):
    """(d_hidden_all, d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias) from d_normed [M, H]."""
    dtype, rows, width = hidden_all.dtype, index.shape[0], hidden_all.shape[1]
    # The [M, H] backward is three fused aten kernels (no autograd: they are the kernels
    # autograd would call). Each elementwise op over [M, H] is a pass over memory and, on a
    # busy CPU, an OpenMP barrier that can cost a scheduler time slice (~16 ms): the
    # formulas written out as ~15 separate torch ops took ~400 ms of a 2 s bert-base step
    # on the 2-core dev machine under load.
    #   LayerNorm: xhat = (act - mean) * rstd, g = d_normed * w,
    #              d_act = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat)),
    #              d_norm_weight = sum_rows(d_normed * xhat), d_norm_bias = sum_rows(d_normed);
    #   GELU:      d_pre = d_act * (Phi(pre) + pre * phi(pre)).
    # Each [M, H] temporary made here is dropped once read (d_normed is the caller's).
    d_act, d_norm_weight, d_norm_bias = torch.ops.aten.native_layer_norm_backward(
        _fp32(d_normed), _fp32(act), [width], _fp32(ln_mean).view(rows, 1), _fp32(ln_rstd).view(rows, 1),
        _fp32(norm_weight), _fp32(norm_bias), [True, True, True])
    d_pre = torch.ops.aten.gelu_backward(d_act, _fp32(pre), approximate="none")
    del d_act
    x = _fp32(hidden_all.index_select(0, index))
    d_dense_weight = torch.mm(d_pre.t(), x)
    del x
    # A matrix-vector product rather than d_pre.sum(0): BLAS reads d_pre once, in order
    # (torch's column reduction is far slower on CPU; see compiled/cross_entropy.py).
    d_dense_bias = torch.mv(d_pre.t(), d_pre.new_ones(rows))
    d_x = torch.mm(d_pre, _fp32(dense_weight))
    del d_pre
    # fp32 rows in, fp32 sums out: rows repeated in `index` are added before the one rounding.
    d_hidden_all = scatter_add_rows(d_x, index, hidden_all.shape[0], deterministic=deterministic)
    return (d_hidden_all.to(dtype), d_dense_weight.to(dtype), d_dense_bias.to(dtype), d_norm_weight.to(dtype),
            d_norm_bias.to(dtype))


def mlm_head_forward(hidden_all: torch.Tensor, index: torch.Tensor, dense_weight: torch.Tensor,
                     dense_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                     decoder_weight: torch.Tensor, decoder_bias: Optional[torch.Tensor], targets: torch.Tensor, *,
                     layer_norm_eps: float, ignore_index: int, label_smoothing: float, z_loss: float,
                     chunk_size: Optional[int] = None):
    """(row_loss fp32 [M], lse fp32 [M], pre, act, normed [M, H] in hidden_all's dtype, ln_mean, ln_rstd fp32 [M]).

    hidden_all [N, H] (any strides), index int32/int64 [M] in [0, N), dense_weight [H, H],
    dense_bias/norm_weight/norm_bias [H], decoder_weight [V, H], decoder_bias [V] or None,
    targets int64 [M]. `chunk_size`: vocabulary columns per streamed cross-entropy chunk.
    """
    check_head_inputs(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, targets)
    pre, act, normed, ln_mean, ln_rstd = _transform_forward(hidden_all, index, dense_weight, dense_bias,
                                                            norm_weight, norm_bias, layer_norm_eps)
    row_loss, lse = ce.cross_entropy_forward(normed, decoder_weight, decoder_bias, targets,
                                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                                             z_loss=z_loss, chunk_size=chunk_size)
    return row_loss, lse, pre, act, normed, ln_mean, ln_rstd


def mlm_head_backward(grad_row_loss: torch.Tensor, hidden_all: torch.Tensor, index: torch.Tensor,
                      dense_weight: torch.Tensor, dense_bias: torch.Tensor, norm_weight: torch.Tensor,
                      norm_bias: torch.Tensor, decoder_weight: torch.Tensor, decoder_bias: Optional[torch.Tensor],
                      targets: torch.Tensor, pre: torch.Tensor, act: torch.Tensor, normed: torch.Tensor,
                      ln_mean: torch.Tensor, ln_rstd: torch.Tensor, lse: torch.Tensor, *, layer_norm_eps: float,
                      ignore_index: int, label_smoothing: float, z_loss: float, deterministic: bool = False,
                      chunk_size: Optional[int] = None):
    """(d_hidden_all [N, H], d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias, d_decoder_weight,
    d_decoder_bias or None), each in its input's dtype, from grad_row_loss [M] and the forward's outputs.

    `layer_norm_eps` is unused (ln_rstd already holds it); it is taken so the argument list is the op's.
    `deterministic` forbids atomics in the CUDA scatter of d_hidden_all (the CPU one never uses them).
    """
    check_head_inputs(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, targets)
    rows, width = index.shape[0], hidden_all.shape[1]
    for name, t, shape in (("pre", pre, (rows, width)), ("act", act, (rows, width)),
                           ("normed", normed, (rows, width)), ("ln_mean", ln_mean, (rows,)),
                           ("ln_rstd", ln_rstd, (rows,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    d_normed, d_decoder_weight, d_decoder_bias = ce.cross_entropy_backward(
        grad_row_loss, normed, decoder_weight, decoder_bias, targets, lse, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size)
    grads = _transform_backward(d_normed, hidden_all, index, dense_weight, norm_weight, norm_bias, pre, act,
                                ln_mean, ln_rstd, deterministic)
    return (*grads, d_decoder_weight, d_decoder_bias)


def mlm_head_forward_backward(hidden_all: torch.Tensor, index: torch.Tensor, dense_weight: torch.Tensor,
                              dense_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                              decoder_weight: torch.Tensor, decoder_bias: Optional[torch.Tensor],
                              targets: torch.Tensor, *, layer_norm_eps: float, ignore_index: int,
                              label_smoothing: float, z_loss: float, deterministic: bool = False,
                              grad_scale: float = 1.0):
    """(row_loss, lse, d_hidden_all, d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias, d_decoder_weight,
    d_decoder_bias or None): the forward and the gradient of grad_scale * sum(row_loss), in one call.

    For a mean or sum reduction every row's upstream gradient is one scalar, so the
    gradients are known at forward time up to that factor. The cross-entropy part is
    `cross_entropy_forward_backward` (on the CPU, at small M, one chunk of the whole
    vocabulary: the logits are multiplied out once, not again in a backward); the [M, H]
    activations are dropped here instead of being saved for a backward.
    """
    check_head_inputs(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, targets)
    pre, act, normed, ln_mean, ln_rstd = _transform_forward(hidden_all, index, dense_weight, dense_bias,
                                                            norm_weight, norm_bias, layer_norm_eps)
    row_loss, lse, d_normed, d_decoder_weight, d_decoder_bias = ce.cross_entropy_forward_backward(
        normed, decoder_weight, decoder_bias, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, grad_scale=grad_scale)
    del normed
    grads = _transform_backward(d_normed, hidden_all, index, dense_weight, norm_weight, norm_bias, pre, act,
                                ln_mean, ln_rstd, deterministic)
    return (row_loss, lse, *grads, d_decoder_weight, d_decoder_bias)
