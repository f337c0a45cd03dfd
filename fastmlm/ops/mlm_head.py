"""`mlm_head`: BERT's MLM head (dense, erf-GELU, LayerNorm, decoder) and its loss on
the masked rows `index` of `hidden_all` only (docs/ops.md `mlm_head`).

The forward custom op returns the per-row losses, the log-sum-exp and the small
[M, H] activations a fused backward needs (pre-GELU, post-GELU, LayerNorm output,
LayerNorm mean and rstd); every backend's forward produces the same set, so the
backward may pick a different backend than the forward did. Reduction is plain
torch outside the op, as for `mlm_cross_entropy`. Backends: `triton` (gathered
GEMM + GELU epilogue, LayerNorm kernel, streamed cross-entropy; no [M, V] logits),
`cuda` and `cpu` (the [M, H] part in torch, the vocabulary part through the compiled
streamed cross-entropy) and `torch` (the reference; backward by autograd recomputation).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    REFERENCE_FLOAT_DTYPES,
    check_index_range,
    check_loss_options,
    check_same_device,
    check_tensor,
    value_checks_enabled,
)
from fastmlm.ops.cross_entropy import REDUCTIONS
from fastmlm.ops.dispatch import (Backend, BackendTable, call_device, compiled_why_not, dtype_why_not,
                                   recompute_backward, triton_why_not)
from fastmlm.ops.registration import autocast_floats, register_autocast
from fastmlm.ops.summed_loss import check_single_backward, mean_count, scale_saved_gradients, summed_loss_scale
from fastmlm.reference import mlm_head as reference

MLM_HEAD = BackendTable("mlm_head")
# The Triton LayerNorm kernels hold one whole row in registers.
TRITON_MAX_HIDDEN = 16384
# Forward: row_loss, lse, pre, act, normed, ln_mean, ln_rstd. Backward: the gradients of
# hidden_all, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias.
SevenTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _triton_why_not(device_type, hidden_all, *args) -> Optional[str]:
    reason = (triton_why_not(device_type, call_device(device_type, hidden_all))
              or dtype_why_not(hidden_all.dtype, FLOAT_DTYPES))
    if reason is None and hidden_all.shape[1] > TRITON_MAX_HIDDEN:
        reason = f"hidden size {hidden_all.shape[1]} > {TRITON_MAX_HIDDEN} (LayerNorm row must fit one block)"
    return reason


def _triton_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                    decoder_bias, targets, layer_norm_eps, ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.triton import mlm_head as kernel

    return kernel.mlm_head_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                                   decoder_weight, decoder_bias, targets, layer_norm_eps=layer_norm_eps,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)


def _triton_backward(grad, hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                     decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse, layer_norm_eps,
                     ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.triton import mlm_head as kernel

    return kernel.mlm_head_backward(grad, hidden_all, index, dense_weight, norm_weight, decoder_weight,
                                    decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse,
                                    ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                                    deterministic=torch.are_deterministic_algorithms_enabled())


def _compiled_on(device: str):
    def why_not(device_type, hidden_all, *args) -> Optional[str]:
        if device_type != device:
            return f"serves {device} tensors, not {device_type}"
        return (compiled_why_not(device_type, "mlm_head", call_device(device_type, hidden_all))
                or dtype_why_not(hidden_all.dtype, FLOAT_DTYPES))

    return why_not


def _compiled_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, targets, layer_norm_eps, ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.compiled import mlm_head as kernel

    return kernel.mlm_head_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                                   decoder_weight, decoder_bias, targets, layer_norm_eps=layer_norm_eps,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)


def _compiled_backward(grad, hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                       decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse, layer_norm_eps,
                       ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.compiled import mlm_head as kernel

    return kernel.mlm_head_backward(grad, hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                                    decoder_weight, decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse,
                                    layer_norm_eps=layer_norm_eps, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, z_loss=z_loss,
                                    deterministic=torch.are_deterministic_algorithms_enabled())


def _compiled_forward_backward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                               decoder_bias, targets, layer_norm_eps, ignore_index, label_smoothing, z_loss,
                               grad_scale):
    # (row_loss, lse, then the 7 gradients of grad_scale * sum(row_loss)): Backend.forward_backward.
    from fastmlm.kernels.compiled import mlm_head as kernel

    return kernel.mlm_head_forward_backward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias,
                                            decoder_weight, decoder_bias, targets, layer_norm_eps=layer_norm_eps,
                                            ignore_index=ignore_index, label_smoothing=label_smoothing,
                                            z_loss=z_loss, deterministic=torch.are_deterministic_algorithms_enabled(),
                                            grad_scale=grad_scale)


def _reference_forward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                       decoder_bias, targets, layer_norm_eps, ignore_index, label_smoothing, z_loss):
    return reference.mlm_head_forward_saved(
        hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
        targets, layer_norm_eps=layer_norm_eps, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss)


def _reference_backward(grad, hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                        decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse, layer_norm_eps,
                        ignore_index, label_smoothing, z_loss):
    def row_loss(hidden_all, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias):
        return reference.mlm_head_forward(
            hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
            targets, layer_norm_eps=layer_norm_eps, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss)[0]

    inputs = [hidden_all, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias]
    return tuple(recompute_backward(row_loss, inputs, [t is not None for t in inputs], [grad]))


MLM_HEAD.register(Backend("triton", _triton_why_not, _triton_forward, _triton_backward))
def _compiled_fuses(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, *args):
    from fastmlm.kernels.compiled import cross_entropy

    return cross_entropy.fits_one_chunk(hidden_all.device.type, index.shape[0], decoder_weight.shape[0])


for _device in ("cuda", "cpu"):
    MLM_HEAD.register(Backend(_device, _compiled_on(_device), _compiled_forward, _compiled_backward,
                              _compiled_forward_backward, _compiled_fuses))
MLM_HEAD.register(Backend("torch", lambda *a: None, _reference_forward, _reference_backward))


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastmlm::mlm_head", mutates_args=())
def _forward_op(hidden_all: torch.Tensor, index: torch.Tensor, dense_weight: torch.Tensor, dense_bias: torch.Tensor,
                norm_weight: torch.Tensor, norm_bias: torch.Tensor, decoder_weight: torch.Tensor,
                decoder_bias: Optional[torch.Tensor], targets: torch.Tensor, layer_norm_eps: float,
                ignore_index: int, label_smoothing: float, z_loss: float) -> SevenTensors:
    args = (hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
            targets, layer_norm_eps, ignore_index, label_smoothing, z_loss)
    return tuple(MLM_HEAD.choose(hidden_all.device.type, *args).forward(*args))


@_forward_op.register_fake
def _(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias, targets,
      layer_norm_eps, ignore_index, label_smoothing, z_loss):
    rows, hidden = index.shape[0], hidden_all.shape[1]
    stat = _stat_dtype(hidden_all.dtype)
    per_row = [hidden_all.new_empty(rows, dtype=stat) for _ in range(2)]
    activations = [hidden_all.new_empty(rows, hidden) for _ in range(3)]
    ln_stats = [hidden_all.new_empty(rows, dtype=stat) for _ in range(2)]
    return (*per_row, *activations, *ln_stats)


@torch.library.custom_op("fastmlm::mlm_head_backward", mutates_args=())
def _backward_op(grad_row_loss: torch.Tensor, hidden_all: torch.Tensor, index: torch.Tensor,
                 dense_weight: torch.Tensor, dense_bias: torch.Tensor, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, decoder_weight: torch.Tensor, decoder_bias: Optional[torch.Tensor],
                 targets: torch.Tensor, pre: torch.Tensor, act: torch.Tensor, normed: torch.Tensor,
                 ln_mean: torch.Tensor, ln_rstd: torch.Tensor, lse: torch.Tensor, layer_norm_eps: float,
                 ignore_index: int, label_smoothing: float, z_loss: float) -> SevenTensors:
    args = (grad_row_loss, hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
            decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse, layer_norm_eps, ignore_index,
            label_smoothing, z_loss)
    grads = MLM_HEAD.choose(hidden_all.device.type, hidden_all).backward(*args)
    return _contiguous(grads)


@_backward_op.register_fake
def _(grad_row_loss, hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
      decoder_bias, *rest):
    return _gradients_like(hidden_all, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias)


def _contiguous(grads) -> tuple[torch.Tensor, ...]:
    # Whatever the backend and the inputs' strides (a transposed hidden_all, say), as the
    # fakes promise: Inductor lays out its buffers from the fake and checks the real strides.
    # A custom op cannot return None: an empty tensor stands for "no decoder bias".
    *grads, d_decoder_bias = grads
    d_decoder_bias = grads[0].new_empty(0) if d_decoder_bias is None else d_decoder_bias
    return tuple(g.contiguous() for g in (*grads, d_decoder_bias))


def _gradients_like(*params: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Fake gradients of hidden_all and the six parameters: contiguous, as `_contiguous` makes the real ones."""
    *params, decoder_bias = params
    return (*[p.new_empty(p.shape) for p in params],
            params[0].new_empty(0) if decoder_bias is None else decoder_bias.new_empty(decoder_bias.shape))


def _setup_context(ctx, inputs, output):
    (hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias, targets,
     layer_norm_eps, ignore_index, label_smoothing, z_loss) = inputs
    row_loss, lse, pre, act, normed, ln_mean, ln_rstd = output
    ctx.save_for_backward(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                          decoder_bias, targets, pre, act, normed, ln_mean, ln_rstd, lse)
    ctx.options = (layer_norm_eps, ignore_index, label_smoothing, z_loss)
    ctx.has_decoder_bias = decoder_bias is not None
    # Only row_loss carries a gradient; without this autograd would build
    # zero [M, H] gradients for the unused activation outputs.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_row_loss, *unused_grads):
    # Only row_loss carries gradient: the public function never hands out the others.
    saved = ctx.saved_tensors
    grads = _backward_op(grad_row_loss.contiguous(), *saved, *ctx.options)
    d_hidden_all, d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias, d_decoder_weight, d_decoder_bias = grads
    return (d_hidden_all, None, d_dense_weight, d_dense_bias, d_norm_weight, d_norm_bias, d_decoder_weight,
            d_decoder_bias if ctx.has_decoder_bias else None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_forward_op)


# The scaled, summed loss with its gradients computed in the forward pass, as
# fastmlm::mlm_cross_entropy_summed (see there): used for mean/sum losses
# where the serving backend says it saves work (Backend.fuses).
@torch.library.custom_op("fastmlm::mlm_head_summed", mutates_args=())
def _summed_op(hidden_all: torch.Tensor, index: torch.Tensor, dense_weight: torch.Tensor, dense_bias: torch.Tensor,
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, decoder_weight: torch.Tensor,
               decoder_bias: Optional[torch.Tensor], targets: torch.Tensor, layer_norm_eps: float,
               ignore_index: int, label_smoothing: float, z_loss: float, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
            targets, layer_norm_eps, ignore_index, label_smoothing, z_loss)
    backend = MLM_HEAD.choose(hidden_all.device.type, *args)
    if backend.forward_backward is not None:
        row_loss, lse, *grads = backend.forward_backward(*args, scale)
    else:  # any backend: its forward, then its backward with every row weighted `scale`
        row_loss, lse, *activations = backend.forward(*args)
        grads = backend.backward(torch.full_like(row_loss, scale), *args[:9], *activations, lse, *args[9:])
    return (row_loss.sum() * scale, lse, *_contiguous(grads))


@_summed_op.register_fake
def _(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias, *rest):
    stat = _stat_dtype(hidden_all.dtype)
    return (hidden_all.new_empty((), dtype=stat), hidden_all.new_empty(index.shape[0], dtype=stat),
            *_gradients_like(hidden_all, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                             decoder_bias))


def _setup_summed(ctx, inputs, output):
    ctx.has_decoder_bias = inputs[7] is not None
    ctx.used = False
    # Only the loss carries a gradient: no zero [V, H] gradients for the other outputs,
    # and lse and the saved gradients are plain tensors to autograd (the gradients are
    # handed out by backward; as outputs of this op they would carry its grad_fn).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[2:])


def _backward_summed(ctx, grad_loss, *unused):
    # Scaled in place and handed out (no second copy of each gradient), so one backward pass per forward.
    check_single_backward(ctx, "mlm_head")
    grads = scale_saved_gradients(ctx.saved_tensors, grad_loss)
    return (grads[0], None, *grads[1:6], grads[6] if ctx.has_decoder_bias else None, None, None, None, None, None,
            None)


_summed_op.register_autograd(_backward_summed, setup_context=_setup_summed)
register_autocast(_summed_op)


def _gradient_in_forward(args) -> bool:
    """Use the summed op: gradients are wanted and the serving backend saves work by it."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    params = (args[0], *args[2:8])
    if not any(t is not None and t.requires_grad for t in params):
        return False
    backend = MLM_HEAD.choose(args[0].device.type, *args)
    return backend.forward_backward is not None and backend.fuses is not None and backend.fuses(*args)


def mlm_head(
    hidden_all: torch.Tensor,
    index: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    decoder_weight: torch.Tensor,
    decoder_bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    layer_norm_eps: float = 1e-12,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
):
    """BERT's MLM head and cross-entropy on rows `index` of `hidden_all [N, H]`.

    dense_weight [H, H], dense_bias/norm_weight/norm_bias [H], decoder_weight [V, H],
    decoder_bias [V] or None, targets int64 [M] (one per row of `index`). Reductions as
    `mlm_cross_entropy`: `mean` over non-ignored targets (0 if none). See docs/ops.md.
    """
    if isinstance(hidden_all, torch.Tensor):
        (hidden_all, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
         decoder_bias) = autocast_floats(hidden_all.device.type, hidden_all, dense_weight, dense_bias, norm_weight,
                                         norm_bias, decoder_weight, decoder_bias)
    check_tensor("hidden_all", hidden_all, ndim=2, dtypes=REFERENCE_FLOAT_DTYPES)
    check_tensor("index", index, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int64,))
    hidden = hidden_all.shape[1]
    if hidden == 0:
        raise ValueError("hidden_all has no features: the head's LayerNorm needs a hidden size of at least 1")
    expected = {"dense_weight": (dense_weight, (hidden, hidden)), "dense_bias": (dense_bias, (hidden,)),
                "norm_weight": (norm_weight, (hidden,)), "norm_bias": (norm_bias, (hidden,))}
    for name, (t, shape) in expected.items():
        check_tensor(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} for hidden size {hidden}")
    check_tensor("decoder_weight", decoder_weight, ndim=2)
    if decoder_weight.shape[1] != hidden:
        raise ValueError(f"decoder_weight has shape {tuple(decoder_weight.shape)}, expected [V, {hidden}]")
    if decoder_weight.shape[0] == 0:
        raise ValueError("decoder_weight has no rows: the vocabulary is empty")
    if decoder_bias is not None:
        check_tensor("decoder_bias", decoder_bias, ndim=1)
        if decoder_bias.shape[0] != decoder_weight.shape[0]:
            raise ValueError(f"decoder_bias has {decoder_bias.shape[0]} entries, decoder_weight has "
                             f"{decoder_weight.shape[0]} rows")
    floats = dict(dense_weight=dense_weight, dense_bias=dense_bias, norm_weight=norm_weight, norm_bias=norm_bias,
                  decoder_weight=decoder_weight, decoder_bias=decoder_bias)
    for name, t in floats.items():
        if t is not None and t.dtype != hidden_all.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, hidden_all has {hidden_all.dtype}: they must match")
    if targets.shape[0] != index.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries but index selects {index.shape[0]} rows")
    check_loss_options(ignore_index, reduction, REDUCTIONS, label_smoothing, z_loss)
    check_same_device(hidden_all=hidden_all, index=index, targets=targets, **floats)
    check_index_range("index", index, hidden_all.shape[0])
    if value_checks_enabled(targets):
        labelled = torch.where(targets == ignore_index, 0, targets)
        check_index_range("targets", labelled, decoder_weight.shape[0], what="vocabulary entries")

    args = (hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
            targets, float(layer_norm_eps), int(ignore_index), float(label_smoothing), float(z_loss))
    if reduction == "none":
        return _forward_op(*args)[0]
    if _gradient_in_forward(args):
        scale, divide_by = summed_loss_scale(targets, ignore_index, reduction)
        loss = _summed_op(*args, scale)[0]
        return loss if divide_by is None else loss / divide_by.to(loss.dtype)
    loss = _forward_op(*args)[0].sum()
    return loss if reduction == "sum" else loss / mean_count(targets, ignore_index).to(loss.dtype)
