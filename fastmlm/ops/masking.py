"""`mask_tokens` and `masked_positions`: MLM masking and label compaction on the device.

Both are integer ops without gradients. Backends: `cuda`, `cpu` (fastmlm._C)
and `torch` (fastmlm.reference.masking); all give bit-identical results
because every random draw is the counter hash of (seed, example, position).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm.ops.checks import (INDEX_DTYPES, check_int, check_same_device, check_tensor, min_max,
                                value_checks_enabled)
from fastmlm.ops.dispatch import Backend, BackendTable, call_device, compiled_why_not
from fastmlm.reference import masking as reference

MASK_TOKENS = BackendTable("mask_tokens")
MASKED_POSITIONS = BackendTable("masked_positions")


def _on(device: str):
    """why_not for compiled kernels that serve one device type."""

    def why_not(device_type: str, *args) -> Optional[str]:
        if device_type != device:
            return f"serves {device} tensors, not {device_type}"
        return compiled_why_not(device_type, "masking", call_device(device_type, args[0] if args else None))

    return why_not


def _compiled_mask_tokens(input_ids, special, attention, mask_token_id, vocab_size, p, seed, exact):
    from fastmlm.kernels.compiled import masking

    return masking.mask_tokens(input_ids, special, attention, mask_token_id=mask_token_id, vocab_size=vocab_size,
                               mlm_probability=p, seed=seed, exact=exact)


def _reference_mask_tokens(input_ids, special, attention, mask_token_id, vocab_size, p, seed, exact):
    return reference.mask_tokens(input_ids, special, attention, mask_token_id=mask_token_id, vocab_size=vocab_size,
                                 mlm_probability=p, seed=seed, exact=exact)


def _compiled_masked_positions(labels, ignore_index, capacity):
    from fastmlm.kernels.compiled import masking

    return masking.masked_positions(labels, ignore_index=ignore_index, capacity=capacity)


def _reference_masked_positions(labels, ignore_index, capacity):
    return reference.masked_positions(labels, ignore_index=ignore_index, capacity=capacity)


for _device in ("cuda", "cpu"):
    MASK_TOKENS.register(Backend(_device, _on(_device), _compiled_mask_tokens))
    MASKED_POSITIONS.register(Backend(_device, _on(_device), _compiled_masked_positions))
MASK_TOKENS.register(Backend("torch", lambda *a: None, _reference_mask_tokens))
MASKED_POSITIONS.register(Backend("torch", lambda *a: None, _reference_masked_positions))


@torch.library.custom_op("fastmlm::mask_tokens", mutates_args=())
def _mask_tokens_op(
    input_ids: torch.Tensor,
    special_tokens_mask: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float,
    seed: int,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (input_ids, special_tokens_mask, attention_mask, mask_token_id, vocab_size, mlm_probability, seed, exact)
    return MASK_TOKENS.choose(input_ids.device.type, *args).forward(*args)


@_mask_tokens_op.register_fake
def _(input_ids, special_tokens_mask, attention_mask, mask_token_id, vocab_size, mlm_probability, seed, exact):
    return torch.empty_like(input_ids, memory_format=torch.contiguous_format), input_ids.new_empty(input_ids.shape, dtype=torch.int64)


@torch.library.custom_op("fastmlm::masked_positions", mutates_args=())
def _masked_positions_op(labels: torch.Tensor, ignore_index: int, capacity: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return MASKED_POSITIONS.choose(labels.device.type, labels, ignore_index, capacity).forward(labels, ignore_index, capacity)


@_masked_positions_op.register_fake
def _(labels, ignore_index, capacity):
    if capacity is None:
        size = torch.library.get_ctx().new_dynamic_size()
    else:
        size = capacity
    return labels.new_empty(size, dtype=torch.int64), labels.new_empty((), dtype=torch.int64)


def _seed_from(seed: int, generator: Optional[torch.Generator]) -> int:
    if generator is not None:
        return int(torch.randint(2**62, (), generator=generator, device=generator.device))
    # The custom op's schema carries int64: fold the seed into the signed range
    # (the kernels use its 64 bits modulo 2**64, so nothing is lost).
    seed = check_int("seed", seed) % (1 << 64)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    special_tokens_mask: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    budget: str = "bernoulli",
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: returns (masked_ids, labels); see docs/ops.md for the exact rule.

    Of the eligible positions (not special, not padding), each is selected with
    probability `mlm_probability` (`budget="bernoulli"`) or exactly
    floor(p * n_eligible + 0.5) per row are (`budget="exact"`). A selected position
    becomes `mask_token_id` (80%), a random id in [0, vocab_size) (10%) or stays
    (10%); `labels` holds its original id, -100 elsewhere. The same seed masks the
    same positions: pass a new one (or a generator) each step. A `generator` only
    draws the seed; a CUDA one is read back to the host (one sync), an int `seed` is
    not (the eager range check of `input_ids` is, unless value checks are off).
    """
    check_tensor("input_ids", input_ids, ndim=(1, 2), dtypes=INDEX_DTYPES)
    if budget not in ("bernoulli", "exact"):
        raise ValueError(f"budget must be 'bernoulli' or 'exact', got {budget!r}")
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    vocab_size, mask_token_id = check_int("vocab_size", vocab_size), check_int("mask_token_id", mask_token_id)
    if not 0 < vocab_size < 2**31:
        raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    masks = {}
    for name, mask in (("special_tokens_mask", special_tokens_mask), ("attention_mask", attention_mask)):
        if mask is not None:
            check_tensor(name, mask)
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"{name} must be bool or integer, got {mask.dtype}")
            if tuple(mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} has shape {tuple(mask.shape)}, input_ids has {tuple(input_ids.shape)}")
            mask = mask.unsqueeze(0) if squeeze else mask
        masks[name] = mask
    check_same_device(input_ids=input_ids, **masks)
    if value_checks_enabled(ids) and ids.numel():
        low, high = min_max(ids)
        if low < 0 or high >= vocab_size:
            raise IndexError(f"input_ids has values outside the vocabulary [0, {vocab_size})")
    masked, labels = _mask_tokens_op(ids, masks["special_tokens_mask"], masks["attention_mask"], mask_token_id,
                                     vocab_size, float(mlm_probability), _seed_from(seed, generator), budget == "exact")
    return (masked[0], labels[0]) if squeeze else (masked, labels)


def masked_positions(labels: torch.Tensor, *, ignore_index: int = -100, capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, count): flat indices of the labelled entries, in order; see docs/ops.md.

    With `capacity`, `index` has exactly `capacity` entries (tail filled with 0)
    and nothing waits on the device; `count` may exceed `capacity`.
    """
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
    return _masked_positions_op(labels, check_int("ignore_index", ignore_index, int64=True), capacity)
