"""MLMCollator: pad packed examples into a batch, WITHOUT masking.

Masking happens later, on the device, inside the training step
(`fastmlm.ops.mask_tokens` with a seed derived from the run seed and the step):
the batch that leaves the host is the same whatever the masking, so a resumed
run masks identically and the host does no per-token random work.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from fastmlm.data.packing import PackedExample

Example = Union[PackedExample, Mapping[str, Sequence[int]]]


def _field(example: Example, name: str) -> Sequence[int] | None:
    if isinstance(example, Mapping):
        return example.get(name)
    return getattr(example, name)


class MLMCollator:
    """Pads a list of examples into int64 tensors [batch, padded_length]:

    input_ids           pad_token_id in padding
    attention_mask      1 on real tokens, 0 on padding
    token_type_ids      the example's types (0 where absent), 0 in padding
    special_tokens_mask 1 on [CLS]/[SEP] and on padding: taken from the example's
                        own special_tokens_mask, else 1 where the id is in
                        special_token_ids

    padded_length is the longest example rounded up to pad_to_multiple_of (tensor
    cores and kernels like multiples of 8), never beyond max_length. An example
    longer than max_length is an error, not a silent truncation.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        pad_to_multiple_of: int = 8,
        max_length: int | None = None,
        special_token_ids: Sequence[int] = (),
    ):
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.special_token_ids = torch.tensor(sorted(set(special_token_ids)), dtype=torch.int64)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        ids = [_field(e, "input_ids") for e in examples]
        if any(i is None or len(i) == 0 for i in ids):
            raise ValueError("every example needs a non-empty input_ids")
        longest = max(len(i) for i in ids)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"an example has {longest} tokens, more than max_length={self.max_length}")
        m = self.pad_to_multiple_of
        padded_length = -(-longest // m) * m
        if self.max_length is not None:
            padded_length = min(padded_length, self.max_length)

        shape = (len(examples), padded_length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros(shape, dtype=torch.int64)
        token_type_ids = torch.zeros(shape, dtype=torch.int64)
        special_tokens_mask = torch.ones(shape, dtype=torch.int64)
        for row, example in enumerate(examples):
            n = len(ids[row])
            input_ids[row, :n] = torch.as_tensor(ids[row], dtype=torch.int64)
            attention_mask[row, :n] = 1
            types = _field(example, "token_type_ids")
            if types is not None:
                if len(types) != n:
                    raise ValueError(f"example {row}: token_type_ids has {len(types)} entries, input_ids {n}")
                token_type_ids[row, :n] = torch.as_tensor(types, dtype=torch.int64)
            special = _field(example, "special_tokens_mask")
            if special is None:
                special_tokens_mask[row, :n] = torch.isin(input_ids[row, :n], self.special_token_ids).long()
            else:
                if len(special) != n:
                    raise ValueError(f"example {row}: special_tokens_mask has {len(special)} entries, input_ids {n}")
                special_tokens_mask[row, :n] = torch.as_tensor(special, dtype=torch.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "special_tokens_mask": special_tokens_mask,
        }
