"""Unpad a padded batch into one packed sequence, and re-pad it.

The encoder never computes on padding: a `[batch, seq]` batch becomes `total`
packed tokens with `cu_seqlens` (int32, sequence b is rows
`cu_seqlens[b]:cu_seqlens[b+1]`) before the embedding, and stays packed through
every layer.

Static shapes (`token_capacity`): the packed length is a fixed T whatever the
mask holds, so `torch.compile(fullgraph=True)` and CUDA graphs see no
data-dependent size and the host never waits. Spare slots gather token 0 of
the batch (a valid row) and form dummy sequences after the real ones; each
dummy sequence is at most `seq` long so that `max_seqlen` stays `seq` (a
single dummy sequence of up to T tokens would make attention size its grid,
and the reference its padded view, for a sequence of length T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastmlm.ops import masked_positions

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """A batch as the layers see it: packed token rows and their sequences.

    input_ids, token_type_ids, position_ids: [T] (T = real tokens, or the token capacity).
    cu_seqlens: int32 [num_sequences + 1]; max_seqlen: a host int bounding every length.
    index: int64 [T], flat index into the padded [batch * seq] of each packed row
        (spare slots: 0), or None for input that arrived packed.
    valid: bool [T], False on spare slots, or None when every slot is real.
    padded_shape: (batch, seq), or None for input that arrived packed.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    padded_shape: Optional[tuple[int, int]] = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def gather(self, padded: torch.Tensor, fill: int) -> torch.Tensor:
        """Packed rows of a padded per-token tensor; `fill` on spare slots."""
        if self.index is None:
            return padded
        rows = padded.reshape(-1)[self.index]
        return rows if self.valid is None else torch.where(self.valid, rows, fill)

    def flat_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Index into the caller's flattened input of packed `rows`."""
        return rows if self.index is None else self.index[rows]

    def repad(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] packed rows -> [batch, seq, H], zeros at padding."""
        if self.padded_shape is None:
            return hidden
        batch, seq = self.padded_shape
        target = self.index
        if self.valid is not None:
            # Spare slots write to a trash row past the end, so they cannot
            # overwrite the real token 0 that they copied.
            target = torch.where(self.valid, target, batch * seq)
        out = hidden.new_zeros(batch * seq + 1, hidden.shape[-1])
        out = out.index_put((target,), hidden)
        return out[: batch * seq].view(batch, seq, -1)


def append_spare_sequences(cu_seqlens: torch.Tensor, used: torch.Tensor, capacity: int,
                           max_len: int) -> torch.Tensor:
    """cu_seqlens followed by dummy sequences of at most max_len covering used..capacity.

    `used` (a 0-d tensor, at most capacity) is where the real sequences end. The
    number of dummy entries is ceil(capacity / max_len) whatever `used` is, so
    the shape is static; trailing dummies may be empty.
    """
    num_dummy = -(-capacity // max(max_len, 1))
    steps = torch.arange(1, num_dummy + 1, device=cu_seqlens.device, dtype=torch.int64) * max_len
    tails = (used.to(torch.int64) + steps).clamp(max=capacity)
    return torch.cat([cu_seqlens.to(torch.int64), tails]).to(torch.int32)


def positions_in_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed row within its own sequence (int64 [total])."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    starts = cu_seqlens.to(torch.int64)
    sequence = torch.searchsorted(starts[1:], rows, right=True)
    return rows - starts[sequence]


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
          token_capacity: Optional[int] = None) -> PackedBatch:
    """Pack the tokens of a [batch, seq] batch where attention_mask is 1.

    Position ids are the column index in the padded batch, as BERT assigns them
    (so left padding keeps HuggingFace's positions).
    """
    batch, seq = input_ids.shape
    keep = attention_mask.reshape(-1) != 0
    lengths = (attention_mask != 0).sum(dim=1)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int64, device=input_ids.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    valid = None
    if token_capacity is None:
        index = torch.nonzero(keep).view(-1)  # data-dependent size: the host waits
        cu_seqlens = cu_seqlens.to(torch.int32)
    else:
        index, count = masked_positions(keep.to(torch.int64), ignore_index=0, capacity=token_capacity)
        valid = torch.arange(token_capacity, device=input_ids.device) < count
        # Tokens past the capacity are dropped (callers check count <= capacity
        # when they may read it); clamping keeps every boundary inside [0, T].
        cu_seqlens = cu_seqlens.clamp(max=token_capacity)
        cu_seqlens = append_spare_sequences(cu_seqlens, cu_seqlens[-1], token_capacity, seq)
    column = index % seq
    return PackedBatch(
        input_ids=input_ids.reshape(-1)[index],
        token_type_ids=token_type_ids.reshape(-1)[index],
        position_ids=column,
        cu_seqlens=cu_seqlens,
        max_seqlen=seq,
        index=index,
        valid=valid,
        padded_shape=(batch, seq),
    )


def pack_given(input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> PackedBatch:
    """Input that arrives packed: 1-D ids with cu_seqlens; positions restart per sequence."""
    return PackedBatch(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        position_ids=positions_in_sequences(cu_seqlens, input_ids.shape[0]),
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
    )


def shift_labels_within_sequences(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal-LM targets: row t predicts labels[t + 1] of the same sequence; last rows -100."""
    total = labels.shape[0]
    if total == 0:
        return labels
    shifted = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
    # Row cu_seqlens[b+1] - 1 ends sequence b. For an empty sequence this names
    # the last row of an earlier sequence (or wraps -1 to total - 1, the last
    # row of the final non-empty sequence): a last row either way.
    last_rows = (cu_seqlens[1:].to(torch.int64) - 1) % total
    is_last = torch.zeros(total, dtype=torch.bool, device=labels.device)
    is_last = is_last.index_fill(0, last_rows, True)
    return shifted.masked_fill(is_last, IGNORE_INDEX)
