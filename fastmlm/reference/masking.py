"""Reference for `mask_tokens` and `masked_positions` (see docs/ops.md).

Integer torch ops only, no host synchronisation except where the output size
depends on the data (`masked_positions` without a capacity).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastmlm.reference.random import (
    STREAM_ACTION,
    STREAM_SELECT,
    STREAM_TOKEN,
    counter_hash,
    threshold24,
    uniform_int_from_hash,
)

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float,
    seed: int,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking rule on `[batch, seq]` ids; returns (masked_ids, labels)."""
    batch, seq = input_ids.shape
    device = input_ids.device
    rows = torch.arange(batch, device=device).view(batch, 1).expand(batch, seq)
    cols = torch.arange(seq, device=device).view(1, seq).expand(batch, seq)

    eligible = torch.ones(batch, seq, dtype=torch.bool, device=device)
    if special_tokens_mask is not None:
        eligible &= special_tokens_mask == 0
    if attention_mask is not None:
        eligible &= attention_mask != 0

    select_hash = counter_hash(seed, STREAM_SELECT, rows, cols)
    if exact:
        # k = floor(p * n + 0.5) in float64 on every backend, so they agree on k.
        n_eligible = eligible.sum(dim=1).to(torch.float64)
        k = torch.floor(n_eligible * mlm_probability + 0.5).to(torch.int64)
        # Lexicographic key (hash, position) as one int64; ineligible last.
        key = torch.where(eligible, select_hash * seq + cols, torch.iinfo(torch.int64).max)
        order = torch.argsort(key, dim=1)
        rank = torch.empty_like(order).scatter_(1, order, cols.contiguous())
        selected = eligible & (rank < k.view(batch, 1))
    else:
        selected = eligible & ((select_hash >> 8) < threshold24(mlm_probability))

    action = counter_hash(seed, STREAM_ACTION, rows, cols) >> 8
    random_token = uniform_int_from_hash(counter_hash(seed, STREAM_TOKEN, rows, cols), vocab_size)
    to_mask = selected & (action < threshold24(0.8))
    to_random = selected & ~to_mask & (action < threshold24(0.9))

    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(to_random, random_token.to(input_ids.dtype), masked_ids)
    labels = torch.where(selected, input_ids.to(torch.int64), IGNORE_INDEX)
    return masked_ids, labels


def masked_positions(labels: torch.Tensor, *, ignore_index: int, capacity: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of labelled entries in increasing order, and their count."""
    # Compared in int64, as the kernels do: int32 labels against an ignore_index outside
    # int32 would otherwise wrap the scalar (2**32 - 100 would match -100).
    valid = labels.reshape(-1).to(torch.int64) != ignore_index
    count = valid.sum()
    if capacity is None:
        return torch.nonzero(valid).view(-1), count
    # Slot of each labelled entry = number of labelled entries before it;
    # entries past the capacity (and unlabelled ones) go to a spare slot C.
    slot = torch.cumsum(valid, dim=0) - 1
    slot = torch.where(valid & (slot < capacity), slot, capacity)
    positions = torch.arange(valid.numel(), device=labels.device)
    index = torch.zeros(capacity + 1, dtype=torch.int64, device=labels.device)
    index.scatter_(0, slot, torch.where(slot < capacity, positions, 0))
    return index[:capacity].clone(), count


def expected_mask_count(n_eligible: int, mlm_probability: float) -> int:
    """The number of positions `exact` selects in a row with n eligible ones."""
    return math.floor(n_eligible * mlm_probability + 0.5)
