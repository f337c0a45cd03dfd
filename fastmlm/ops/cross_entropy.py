"""`mlm_cross_entropy`: linear layer + softmax cross-entropy without full logits.

The forward custom op returns per-row losses and the log-sum-exp; the
reduction is ordinary torch code outside it, so kernels only see per-row
gradient weights. Backends: `triton` (logit tiles on chip, online
log-sum-exp), `cuda` and `cpu` (vocabulary chunks: torch matmul into one
reused buffer, then a compiled pass), `torch` (dense logits, the reference).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm.ops.checks import (
    FLOAT_DTYPES,
    REFERENCE_FLOAT_DTYPES,
    check_index_range,
    check_loss_options,
    check_same_device,
    check_tensor,
    value_checks_enabled,
)
from fastmlm.ops.dispatch import (Backend, BackendTable, call_device, compiled_why_not, dtype_why_not,
                                   triton_why_not)
from fastmlm.ops.registration import autocast_floats, register_autocast
from fastmlm.ops.summed_loss import check_single_backward, mean_count, scale_saved_gradients, summed_loss_scale
from fastmlm.reference import cross_entropy as reference

MLM_CROSS_ENTROPY = BackendTable("mlm_cross_entropy")
REDUCTIONS = ("mean", "sum", "none")


def _triton_why_not(device_type, hidden, *args) -> Optional[str]:
    if hidden.shape[1] == 0:
        return "the kernels need a hidden size of at least 1"
    return triton_why_not(device_type, call_device(device_type, hidden)) or dtype_why_not(hidden.dtype, FLOAT_DTYPES)


def _compiled_on(device: str):
    def why_not(device_type, hidden, *args) -> Optional[str]:
        if device_type != device:
            return f"serves {device} tensors, not {device_type}"
        return (compiled_why_not(device_type, "cross_entropy", call_device(device_type, hidden))
                or dtype_why_not(hidden.dtype, FLOAT_DTYPES))

    return why_not


def _triton_forward(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.triton import cross_entropy as kernel

    return kernel.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, z_loss=z_loss)


def _triton_backward(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.triton import cross_entropy as kernel

    return kernel.cross_entropy_backward(grad, hidden, weight, bias, targets, lse, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, z_loss=z_loss,
                                         deterministic=torch.are_deterministic_algorithms_enabled())


def _compiled_forward(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.compiled import cross_entropy as kernel

    return kernel.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, z_loss=z_loss)


def _compiled_backward(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss):
    from fastmlm.kernels.compiled import cross_entropy as kernel

    return kernel.cross_entropy_backward(grad, hidden, weight, bias, targets, lse, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, z_loss=z_loss)


def _reference_forward(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss):
    return reference.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, z_loss=z_loss)


def _reference_backward(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss):
    return reference.cross_entropy_backward(grad, hidden, weight, bias, targets, lse, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, z_loss=z_loss)


def _compiled_forward_backward(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, grad_scale):
    from fastmlm.kernels.compiled import cross_entropy as kernel

    return kernel.cross_entropy_forward_backward(hidden, weight, bias, targets, ignore_index=ignore_index,
                                                 label_smoothing=label_smoothing, z_loss=z_loss,
                                                 grad_scale=grad_scale)


def _compiled_fuses(hidden, weight, *args) -> bool:
    from fastmlm.kernels.compiled import cross_entropy as kernel

    return kernel.fits_one_chunk(hidden.device.type, hidden.shape[0], weight.shape[0])


MLM_CROSS_ENTROPY.register(Backend("triton", _triton_why_not, _triton_forward, _triton_backward))
for _device in ("cuda", "cpu"):
    MLM_CROSS_ENTROPY.register(Backend(_device, _compiled_on(_device), _compiled_forward, _compiled_backward,
                                       _compiled_forward_backward, _compiled_fuses))
MLM_CROSS_ENTROPY.register(Backend("torch", lambda *a: None, _reference_forward, _reference_backward))


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastmlm::mlm_cross_entropy", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                ignore_index: int, label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    args = (hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss)
    return MLM_CROSS_ENTROPY.choose(hidden.device.type, *args).forward(*args)


@_forward_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss):
    rows = hidden.shape[0]
    dtype = _stat_dtype(hidden.dtype)
    return hidden.new_empty(rows, dtype=dtype), hidden.new_empty(rows, dtype=dtype)


@torch.library.custom_op("fastmlm::mlm_cross_entropy_backward", mutates_args=())
def _backward_op(grad_row_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 targets: torch.Tensor, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                 z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_row_loss, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss)
    backend = MLM_CROSS_ENTROPY.choose(hidden.device.type, hidden, weight, bias, targets, ignore_index,
                                       label_smoothing, z_loss)
    d_hidden, d_weight, d_bias = backend.backward(*args)
    # A custom op cannot return None: an empty tensor stands for "no bias".
    return _contiguous(d_hidden, d_weight, hidden.new_empty(0) if d_bias is None else d_bias)


@_backward_op.register_fake
def _(grad_row_loss, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss):
    return _gradients_like(hidden, weight, bias)


def _contiguous(*gradients: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Whatever the backend and the inputs' strides (a transposed weight, say), as the
    # fakes promise: Inductor lays out its buffers from the fake and checks the real strides.
    return tuple(g.contiguous() for g in gradients)


def _gradients_like(hidden, weight, bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake gradients of (hidden, weight, bias): contiguous, as `_contiguous` makes the real ones."""
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.options = (ignore_index, label_smoothing, z_loss)


def _backward(ctx, grad_row_loss, grad_lse):
    # grad_lse is always zero: the public function hands lse out detached.
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    d_hidden, d_weight, d_bias = _backward_op(grad_row_loss.contiguous(), hidden, weight, bias, targets, lse, *ctx.options)
    return d_hidden, d_weight, (d_bias if bias is not None else None), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_forward_op)


# The scaled, summed loss `scale * sum(row_loss)` with its gradient computed
# in the forward pass. With a mean or sum reduction the upstream gradient of
# every row is the same scalar, so the gradient can be formed while the
# logits are at hand: a backend that keeps one chunk of the whole vocabulary
# multiplies the logits out once instead of twice (forward, then again in
# backward), as Liger-Kernel's fused linear cross-entropy does. `scale`
# (1 / count for a mean whose count is on the host) is folded into dz, so a
# backward with upstream gradient 1 hands the gradients out untouched.
# Used only where the serving backend says it saves work (Backend.fuses).
@torch.library.custom_op("fastmlm::mlm_cross_entropy_summed", mutates_args=())
def _summed_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
               ignore_index: int, label_smoothing: float, z_loss: float, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss)
    backend = MLM_CROSS_ENTROPY.choose(hidden.device.type, *args)
    if backend.forward_backward is not None:
        row_loss, lse, d_hidden, d_weight, d_bias = backend.forward_backward(*args, scale)
    else:
        row_loss, lse = backend.forward(*args)
        weights = torch.full_like(row_loss, scale)
        d_hidden, d_weight, d_bias = backend.backward(weights, hidden, weight, bias, targets, lse, ignore_index,
                                                      label_smoothing, z_loss)
    d_bias = hidden.new_empty(0) if d_bias is None else d_bias
    return row_loss.sum() * scale, lse, *_contiguous(d_hidden, d_weight, d_bias)


@_summed_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, scale):
    dtype = _stat_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=dtype), hidden.new_empty(hidden.shape[0], dtype=dtype),
            *_gradients_like(hidden, weight, bias))


def _setup_summed(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.used = False
    # Only the loss carries a gradient: no zero [V, H] gradients for the other outputs,
    # and lse and the saved gradients are plain tensors to autograd (the gradients are
    # handed out by backward; as outputs of this op they would carry its grad_fn).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[2:])


def _backward_summed(ctx, grad_loss, grad_lse, *unused):
    # The saved gradients are scaled in place and handed out: they become the
    # parameters' .grad without a second [V, H] copy. So this backward can run
    # once; a second pass (retain_graph=True) would see scaled values.
    check_single_backward(ctx, "mlm_cross_entropy")
    d_hidden, d_weight, d_bias = scale_saved_gradients(ctx.saved_tensors, grad_loss)
    return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, None, None, None


_summed_op.register_autograd(_backward_summed, setup_context=_setup_summed)
register_autocast(_summed_op)


def _gradient_in_forward(args) -> bool:
    """Use the summed op: gradients are wanted and the serving backend saves work by it."""
    hidden, weight, bias = args[:3]
    # While compiling, the plain op is traced (the choice reads dispatch state).
    if torch.compiler.is_compiling():
        return False
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return False
    backend = MLM_CROSS_ENTROPY.choose(hidden.device.type, *args)
    return backend.forward_backward is not None and backend.fuses is not None and backend.fuses(*args)


def mlm_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
):
    """`F.cross_entropy(hidden @ weight.T + bias, targets)` (+ z_loss * lse**2), without `[M, V]` logits.

    `mean` divides by the number of targets that are not `ignore_index`; with
    none, the loss is 0 and every gradient is 0. See docs/ops.md.
    """
    if isinstance(hidden, torch.Tensor):
        hidden, weight, bias = autocast_floats(hidden.device.type, hidden, weight, bias)
    check_tensor("hidden", hidden, ndim=2, dtypes=REFERENCE_FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2)
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int64,))
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                        + ("" if bias is None else f", {bias.dtype}"))
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [V, {hidden.shape[1]}] to match hidden")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: the vocabulary is empty")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries but hidden has {hidden.shape[0]} rows")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, weight has {weight.shape[0]} rows")
    check_loss_options(ignore_index, reduction, REDUCTIONS, label_smoothing, z_loss)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    if value_checks_enabled(targets):
        labelled = torch.where(targets == ignore_index, 0, targets)
        check_index_range("targets", labelled, weight.shape[0], what="vocabulary entries")

    args = (hidden, weight, bias, targets, int(ignore_index), float(label_smoothing), float(z_loss))
    if reduction == "none":
        loss, lse = _forward_op(*args)
    elif _gradient_in_forward(args):
        scale, divide_by = summed_loss_scale(targets, ignore_index, reduction)
        loss, lse, *_ = _summed_op(*args, scale)
        if divide_by is not None:
            loss = loss / divide_by.to(loss.dtype)
    else:
        row_loss, lse = _forward_op(*args)
        loss = row_loss.sum()
        if reduction == "mean":
            loss = loss / mean_count(targets, ignore_index).to(loss.dtype)
    # lse is handed out detached: the kernels' backward takes no gradient through it.
    return (loss, lse.detach()) if return_lse else loss
