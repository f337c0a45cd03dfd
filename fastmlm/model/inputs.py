"""Input checks for Encoder and MaskedLM, raised before any kernel runs.

Shape and dtype checks read metadata and always run. Value checks (ids in the
vocabulary, a 0/1 mask, labels in range) read tensor contents, a host
synchronisation on a GPU; they are skipped while torch.compile traces, during
CUDA graph capture and inside `fastmlm.ops.checks.no_value_checks()`.
"""
from __future__ import annotations

import torch

from fastmlm.config import EncoderConfig
from fastmlm.ops.checks import min_max, value_checks_enabled

IGNORE_INDEX = -100


def _integer_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def _same_shape(name: str, t: torch.Tensor, input_ids: torch.Tensor) -> None:
    if t.shape != input_ids.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {tuple(input_ids.shape)}")
    if t.device != input_ids.device:
        raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")


def _check_range(name: str, t: torch.Tensor, upper: int, what: str) -> None:
    if t.numel() and value_checks_enabled(t):
        low, high = min_max(t)
        if low < 0 or high >= upper:
            bad = low if low < 0 else high
            raise ValueError(f"{name} contains {bad}, outside [0, {upper}) ({what})")


def check_encoder_inputs(config: EncoderConfig, input_ids, attention_mask, token_type_ids, cu_seqlens,
                         max_seqlen, labels, token_capacity):
    """Validate; return (input_ids, attention_mask or None, token_type_ids, max_seqlen) with defaults filled."""
    _integer_tensor("input_ids", input_ids)
    if input_ids.dtype not in (torch.int32, torch.int64):  # what the embedding lookup takes
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): an encoder call needs at least "
                         "one sequence of at least one token")
    if cu_seqlens is None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)} "
                "(1-D packed input needs cu_seqlens; use input_ids[None] for one sequence)")
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only for packed input (with cu_seqlens)")
        seq = input_ids.shape[1]
        if seq > config.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.int32)
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            _same_shape("attention_mask", attention_mask, input_ids)
            if attention_mask.numel() and value_checks_enabled(attention_mask):
                if not ((attention_mask == 0) | (attention_mask == 1)).all():
                    raise ValueError("attention_mask must hold only 0 and 1 (1 = real token, 0 = padding)")
    else:
        if attention_mask is not None:
            raise ValueError("packed input (cu_seqlens) takes no attention_mask: every row is a real token")
        if input_ids.dim() != 1:
            raise ValueError(f"packed input_ids must be 1-D [total_tokens], got shape {tuple(input_ids.shape)}")
        max_seqlen = _check_cu_seqlens(config, cu_seqlens, max_seqlen, input_ids)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    else:
        _integer_tensor("token_type_ids", token_type_ids)
        if token_type_ids.dtype not in (torch.int32, torch.int64):  # what the embedding lookup takes
            raise TypeError(f"token_type_ids must be int32 or int64, got {token_type_ids.dtype}")
        _same_shape("token_type_ids", token_type_ids, input_ids)
        _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
    _check_range("input_ids", input_ids, config.vocab_size, "the vocabulary")
    if labels is not None:
        _integer_tensor("labels", labels)
        _same_shape("labels", labels, input_ids)
        if labels.numel() and value_checks_enabled(labels):
            labelled = labels != IGNORE_INDEX
            outside = (labelled & ((labels < 0) | (labels >= config.vocab_size))).any()
            at_padding = ((labelled & (attention_mask == 0)).any() if attention_mask is not None
                          else torch.zeros_like(outside))
            outside, at_padding = torch.stack([outside, at_padding]).tolist()  # one read (a GPU sync)
            if outside:
                raise ValueError(f"labels must be -100 or in [0, {config.vocab_size}) (the vocabulary)")
            if at_padding:
                raise ValueError("labels name padding positions (attention_mask 0); set them to -100")
    if token_capacity is not None and cu_seqlens is None and value_checks_enabled(attention_mask):
        real = int((attention_mask != 0).sum())
        if real > token_capacity:
            raise ValueError(f"the batch has {real} real tokens, more than token_capacity {token_capacity}")
    return input_ids, attention_mask, token_type_ids, max_seqlen


def _check_cu_seqlens(config: EncoderConfig, cu_seqlens, max_seqlen, input_ids) -> int:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be int32 [num_sequences + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != input_ids.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {input_ids.device}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if value_checks_enabled(cu_seqlens):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != input_ids.shape[0] or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {input_ids.shape[0]}")
        longest = int(lengths.max())
        if longest > config.max_position_embeddings:
            raise ValueError(f"a sequence of length {longest} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        if max_seqlen is not None and longest > max_seqlen:
            raise ValueError(f"a sequence of length {longest} exceeds max_seqlen {max_seqlen}")
        if max_seqlen is None:
            max_seqlen = longest
    elif max_seqlen is None:
        raise ValueError("packed input needs max_seqlen when value checks are off (e.g. under torch.compile)")
    return max_seqlen
