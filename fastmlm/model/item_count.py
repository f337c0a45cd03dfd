"""HuggingFace Trainer's `num_items_in_batch`: the loss normaliser under gradient accumulation.

With gradient accumulation the Trainer counts the labelled tokens of all the micro-batches
of one optimiser step and passes that count to every micro-batch's forward (to a model whose
forward takes it); it then leaves each loss unscaled. A loss that is this micro-batch's sum
divided by the step's count makes the accumulated gradient that of the whole step's mean.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

ItemCount = Optional[Union[int, torch.Tensor]]


def check_item_count(count: ItemCount) -> None:
    """A positive int or a one-element tensor (not read: on a GPU that would be a sync)."""
    if count is None:
        return
    if isinstance(count, torch.Tensor):
        if count.numel() != 1 or count.dtype == torch.bool or count.is_complex():
            raise ValueError(f"num_items_in_batch must be a one-element number tensor, got {count.dtype} "
                             f"{tuple(count.shape)}")
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_items_in_batch must be a positive int or a one-element tensor, got {count!r}")


def divide_by_item_count(total: torch.Tensor, count: ItemCount) -> torch.Tensor:
    """A summed loss over the step's item count (checked by `check_item_count`)."""
    if isinstance(count, torch.Tensor):
        # A step whose micro-batches have no labels counts 0: a zero loss, as the mean's.
        count = count.reshape(()).clamp(min=1)
    return total / count
