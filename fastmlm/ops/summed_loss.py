"""What the `*_summed` ops share: the loss `scale * sum(row_loss)` whose
gradients are formed in the forward pass (docs/ops.md, "Gradient in the
forward pass"); used by `mlm_cross_entropy` and `mlm_head`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def mean_count(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The number of non-ignored targets, at least 1 (a mean over none is 0), as a tensor: no host sync."""
    return (targets != ignore_index).sum().clamp(min=1)


def summed_loss_scale(targets: torch.Tensor, ignore_index: int,
                      reduction: str) -> tuple[float, Optional[torch.Tensor]]:
    """(scale for the summed op, a count to divide its loss by afterwards, or None).

    On the CPU a mean's count is read for free, so 1 / count is folded into the
    gradients at forward time and a backward whose upstream gradient is 1 has no
    [V, H] pass to make. Elsewhere reading it would wait for the device: the op
    sums with scale 1 and the loss is divided by the count tensor, whose
    gradient autograd hands to the op's backward to scale with.
    """
    if reduction == "sum":
        return 1.0, None
    count = mean_count(targets, ignore_index)
    if count.device.type == "cpu":
        return 1.0 / int(count), None
    return 1.0, count


def check_single_backward(ctx, op: str) -> None:
    """Refuse what a summed op's backward cannot give, before it hands out its gradients.

    The gradients were formed in the forward pass as plain tensors: they carry no
    graph, so a double backward (`create_graph=True`, e.g. a gradient penalty)
    would silently see constants; and they are scaled in place, so a second
    backward pass over the same forward (`retain_graph=True`) would see scaled
    values. Grad mode is on inside a backward exactly when it creates a graph.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} has no double backward (create_graph=True): no fastmlm op does; "
                           "compute a loss that needs one in plain PyTorch")
    if ctx.used:
        raise RuntimeError(f"{op} with reduction 'mean'/'sum' supports one backward pass per forward "
                           "(retain_graph=True is not supported); use reduction='none' and reduce it yourself")
    ctx.used = True


def scale_saved_gradients(saved: Sequence[torch.Tensor], grad_loss: torch.Tensor) -> list[torch.Tensor]:
    """The summed op's saved gradients times its upstream gradient, scaled in place.

    In place and handed out, so they become the parameters' .grad with no second
    [V, H] copy; hence one backward per forward (the caller enforces it).
    """
    # `loss.backward()` on a sum or a CPU mean sends exactly 1: nothing to scale,
    # and reading a CPU scalar costs no sync (not while tracing: no values there).
    if not torch.compiler.is_compiling() and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        return list(saved)
    # The fp32 upstream gradient as it is, not rounded to g's dtype first: a loss scale
    # of 2**16 is inf in fp16, 1/3 is 0.2% off in bf16. The product is rounded once.
    return [g.mul_(grad_loss) for g in saved]
