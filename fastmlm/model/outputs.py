"""Model outputs that also index as HuggingFace's `ModelOutput`.

HuggingFace's Trainer and many scripts read a model's output as `out[0]` (the
loss when labels were given), `out[1:]` (the predictions) or `out["loss"]`;
fastmlm's outputs are dataclasses with attributes and, for that, the same
indexing: the tuple is the fields HuggingFace's own output would hold, in its
order, without those that are None (as `ModelOutput.to_tuple()`).
"""
from __future__ import annotations

from typing import ClassVar


class IndexableOutput:
    # The fields that make up the tuple, in order; the others are attributes only.
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def keys(self) -> list[str]:
        return [name for name in self.TUPLE_FIELDS if getattr(self, name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no {key!r} (fields set: {self.keys()})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default
