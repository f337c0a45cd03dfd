"""mask_tokens and masked_positions on the compiled backends (`cpu`, `cuda`).

Semantics: docs/ops.md; reference: fastmlm/reference/masking.py. Kernels:
csrc/{cpu,cuda}/mask_tokens.*, csrc/{cpu,cuda}/masked_positions.*, with the
hash and the per-position decisions shared in csrc/common/{hash,masking}.h.

Probabilities become integer thresholds here (threshold24), once, so every
backend compares the same integers. Neither op synchronises with the host,
except masked_positions without a capacity, whose output size is the data.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm import _ext
from fastmlm.reference.random import split_seed, threshold24

IGNORE_INDEX = -100
_ID_DTYPES = (torch.int32, torch.int64)
# Mask dtypes the kernels read directly (nonzero test); others are compared to 0 first.
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)


def available(device_type: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why these kernels cannot serve tensors of `device_type` (on `device`), or None."""
    return _ext.unavailable_reason(device_type, device)


def _matrix(t: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """(address, dtype tag, row stride, column stride) of a 2-D tensor; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return (_ext.data_ptr(t), _ext.dtype_tag(t), t.stride(0), t.stride(1))


def _mask_operand(mask: Optional[torch.Tensor], input_ids: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.device != input_ids.device:
        raise ValueError(f"{name} is on {mask.device}, input_ids on {input_ids.device}")
    if mask.shape != input_ids.shape:
        # Broadcast views (stride 0) cost nothing and the kernels take strides.
        try:
            mask = mask.expand(input_ids.shape)
        except RuntimeError:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}") from None
    if mask.dtype not in _MASK_DTYPES:
        mask = mask != 0
    return mask


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
    """BERT masking of `input_ids` int32/int64 `[batch, length]` (any strides).

    Returns `(masked_ids, labels)`: masked_ids has input_ids' dtype, labels is
    int64 with the original id where selected and -100 elsewhere, both
    contiguous `[batch, length]`. `exact` selects k = floor(p * n_eligible +
    0.5) positions per row, else each eligible position with probability p.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if not 0 < vocab_size < 2**31:
        raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
    C = _ext.require(input_ids.device)
    special = _mask_operand(special_tokens_mask, input_ids, "special_tokens_mask")
    attention = _mask_operand(attention_mask, input_ids, "attention_mask")
    batch, length = input_ids.shape
    masked_ids = torch.empty((batch, length), dtype=input_ids.dtype, device=input_ids.device)
    labels = torch.empty((batch, length), dtype=torch.int64, device=input_ids.device)
    if masked_ids.numel() == 0:
        return masked_ids, labels
    seed_lo, seed_hi = split_seed(seed)
    C.mask_tokens(
        input_ids=_matrix(input_ids),
        special_tokens_mask=_matrix(special),
        attention_mask=_matrix(attention),
        masked_ids=masked_ids.data_ptr(),
        labels=labels.data_ptr(),
        batch=batch,
        length=length,
        mask_token_id=int(mask_token_id),
        vocab_size=int(vocab_size),
        seed_lo=seed_lo,
        seed_hi=seed_hi,
        select_threshold=threshold24(mlm_probability),
        mask_threshold=threshold24(0.8),
        random_threshold=threshold24(0.9),
        mlm_probability=float(mlm_probability),
        exact=bool(exact),
        **_ext.launch_args(input_ids),
    )
    return masked_ids, labels


def masked_positions(
    labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, capacity: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row-major) positions of `labels != ignore_index`, increasing, and their count.

    With `capacity` C: index has C entries, the first min(count, C) are the
    positions and the rest 0; count (int64 0-d, same device) is the true
    count; nothing waits for the device. Without: exactly count entries (one
    host sync to read the count).
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    C = _ext.require(labels.device)
    flat = labels.reshape(-1)
    if flat.dtype not in _ID_DTYPES:
        flat = flat.to(torch.int64)
    flat = flat.contiguous()
    numel = flat.numel()
    launch = _ext.launch_args(labels)
    buffer_capacity = numel if capacity is None else capacity
    index = torch.empty(buffer_capacity, dtype=torch.int64, device=labels.device)
    count = torch.empty((), dtype=torch.int64, device=labels.device)
    workspace_elems = C.masked_positions_workspace_elems(numel, launch["device"])
    workspace = torch.empty(workspace_elems, dtype=torch.int64, device=labels.device)
    C.masked_positions(
        labels=_ext.data_ptr(flat),
        labels_dtype=_ext.dtype_tag(flat),
        numel=numel,
        ignore_index=int(ignore_index),
        index=_ext.data_ptr(index),
        capacity=buffer_capacity,
        count=count.data_ptr(),
        workspace=_ext.data_ptr(workspace),
        **launch,
    )
    if capacity is None:
        # The output size is the data: read the count once, keep exactly that many.
        index = index[: int(count.item())].clone()
    return index, count
