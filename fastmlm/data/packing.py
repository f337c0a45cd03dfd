"""Sentence packing: documents of token ids -> `[CLS] A [SEP] B [SEP]` examples.

Consecutive sentences of one document fill an example up to `max_length`;
the filled span is cut at a sentence boundary into segment A (token type 0,
including [CLS] and the first [SEP]) and segment B (token type 1, including the
last [SEP]). A and B are contiguous text: there is no next-sentence prediction,
so no random B. A span of one sentence becomes a single-segment example
`[CLS] A [SEP]`. No token of the corpus is dropped: a sentence longer than an
example is cut into pieces, each its own span.

`PackedExamples` keeps all examples of a corpus in three flat tensors (ids,
token types, offsets) rather than a Python list per example: about 5 bytes per
token, so a corpus of tens of millions of tokens fits in memory.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

# Two special tokens for a single segment, three for a pair.
_PAIR_OVERHEAD = 3


@dataclass(frozen=True)
class PackedExample:
    """One example: token ids with [CLS]/[SEP], token types 0/1, and 1 where a
    position holds [CLS] or [SEP]. All three have the same length."""

    input_ids: list[int]
    token_type_ids: list[int]
    special_tokens_mask: list[int]


def _make_example(segment_a: list[int], segment_b: list[int], cls_token_id: int, sep_token_id: int) -> PackedExample:
    input_ids = [cls_token_id, *segment_a, sep_token_id]
    token_type_ids = [0] * len(input_ids)
    special_tokens_mask = [1] + [0] * len(segment_a) + [1]
    if segment_b:
        input_ids += [*segment_b, sep_token_id]
        token_type_ids += [1] * (len(segment_b) + 1)
        special_tokens_mask += [0] * len(segment_b) + [1]
    return PackedExample(input_ids, token_type_ids, special_tokens_mask)


def pack_documents(
    token_documents: Iterable[Sequence[Sequence[int]]],
    *,
    max_length: int,
    cls_token_id: int,
    sep_token_id: int,
    replace_ids: Iterable[int] = (),
    unk_token_id: int | None = None,
    seed: int = 0,
) -> Iterator[PackedExample]:
    """Yield examples of at most max_length tokens from documents of tokenized sentences.

    token_documents: each document is a sequence of sentences, each a sequence of
        token ids WITHOUT special tokens. Empty sentences are skipped.
    replace_ids: ids that must not appear inside text (e.g. [PAD], [CLS], [SEP],
        [MASK] produced by literal "[SEP]" in a docstring); they become unk_token_id,
        so the only special tokens in an example are the ones packing put there.
    seed: chooses where each span is cut into A and B (deterministic).
    """
    if max_length < _PAIR_OVERHEAD + 2:
        raise ValueError(f"max_length must be at least {_PAIR_OVERHEAD + 2}, got {max_length}")
    replace = frozenset(replace_ids)
    if replace and unk_token_id is None:
        raise ValueError("replace_ids needs unk_token_id")
    rng = random.Random(seed)
    span_budget = max_length - _PAIR_OVERHEAD

    def emit(span: list[list[int]]) -> PackedExample:
        if len(span) == 1:
            return _make_example(span[0], [], cls_token_id, sep_token_id)
        a_end = rng.randint(1, len(span) - 1)
        segment_a = [t for sentence in span[:a_end] for t in sentence]
        segment_b = [t for sentence in span[a_end:] for t in sentence]
        return _make_example(segment_a, segment_b, cls_token_id, sep_token_id)

    for document in token_documents:
        span: list[list[int]] = []
        span_length = 0
        for sentence in document:
            sentence = [unk_token_id if t in replace else int(t) for t in sentence]
            # A sentence that cannot fit even alone is cut into pieces of the
            # single-segment budget (one more token than a pair's).
            pieces = (
                [sentence]
                if len(sentence) <= span_budget
                else [sentence[i : i + span_budget + 1] for i in range(0, len(sentence), span_budget + 1)]
            )
            for piece in pieces:
                if not piece:
                    continue
                if span and span_length + len(piece) > span_budget:
                    yield emit(span)
                    span, span_length = [], 0
                span.append(piece)
                span_length += len(piece)
        if span:
            yield emit(span)


class PackedExamples:
    """All examples of a corpus in flat tensors; indexable like a list of PackedExample."""

    def __init__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, special_tokens_mask: torch.Tensor,
                 offsets: torch.Tensor):
        if not (input_ids.shape == token_type_ids.shape == special_tokens_mask.shape) or input_ids.dim() != 1:
            raise ValueError("input_ids, token_type_ids and special_tokens_mask must be equal-length 1-D tensors")
        if (offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0
                or int(offsets[-1]) != input_ids.numel() or bool((offsets[1:] < offsets[:-1]).any())):
            raise ValueError("offsets must be 1-D and non-decreasing, start at 0 and end at the number of tokens")
        self.input_ids = input_ids.to(torch.int32)
        self.token_type_ids = token_type_ids.to(torch.uint8)
        self.special_tokens_mask = special_tokens_mask.to(torch.uint8)
        self.offsets = offsets.to(torch.int64)

    @classmethod
    def from_examples(cls, examples: Iterable[PackedExample]) -> "PackedExamples":
        ids: list[int] = []
        types: list[int] = []
        special: list[int] = []
        offsets = [0]
        for example in examples:
            ids += example.input_ids
            types += example.token_type_ids
            special += example.special_tokens_mask
            offsets.append(len(ids))
        return cls(
            torch.tensor(ids, dtype=torch.int32),
            torch.tensor(types, dtype=torch.uint8),
            torch.tensor(special, dtype=torch.uint8),
            torch.tensor(offsets, dtype=torch.int64),
        )

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [N]: the number of tokens of each example."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def __getitem__(self, index: int) -> PackedExample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        index %= len(self)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return PackedExample(
            self.input_ids[start:end].tolist(),
            self.token_type_ids[start:end].tolist(),
            self.special_tokens_mask[start:end].tolist(),
        )

    def fingerprint(self) -> str:
        """sha256 of the packed data: equal fingerprints mean identical examples in order."""
        digest = hashlib.sha256()
        for tensor in (self.offsets, self.input_ids, self.token_type_ids, self.special_tokens_mask):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()
