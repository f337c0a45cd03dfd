"""Which examples form the batch of a training step: a pure function of (seed, step).

No sampler state survives between steps, so a resumed run reads exactly the
batches an uninterrupted run would have read, without saving a data-loader
position. Epoch e visits every example once in an order drawn from
`derive_seed(seed, "epoch", e)`; the last partial batch of an epoch is dropped
so every step has the same batch size.

Length bucketing (optional) cuts padding: the epoch's shuffled order is cut
into pools of `bucket_pool_batches` batches, each pool is sorted by length and
cut into batches, and the batches of the whole epoch are shuffled again so
short and long batches alternate rather than arriving in runs.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(base_seed: int, *parts: int | str) -> int:
    """A seed in [0, 2**62) that depends on base_seed and parts, and on nothing else.

    blake2b of the decimal/str parts: stable across processes, Python versions and
    platforms (unlike hash()), and unrelated seeds for neighbouring steps.
    """
    text = "\x1f".join([str(int(base_seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


class StepBatchSampler:
    """batch_indices(step) -> int64 [batch_size] example indices of that step."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, *, seed: int = 0, bucket_pool_batches: int = 0):
        if lengths.dim() != 1:
            raise ValueError("lengths must be a 1-D tensor of example lengths")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if lengths.numel() < batch_size:
            raise ValueError(
                f"the corpus has {lengths.numel()} examples, fewer than one batch of {batch_size}; "
                "use a smaller batch size or a larger corpus"
            )
        if bucket_pool_batches < 0:
            raise ValueError(f"bucket_pool_batches must be >= 0, got {bucket_pool_batches}")
        self.lengths = lengths.to(torch.int64).cpu()
        self.batch_size = batch_size
        self.seed = seed
        self.bucket_pool_batches = bucket_pool_batches
        self.batches_per_epoch = lengths.numel() // batch_size
        self._epoch: int | None = None
        self._epoch_batches: torch.Tensor | None = None

    def _batches_of_epoch(self, epoch: int) -> torch.Tensor:
        """int64 [batches_per_epoch, batch_size]."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        order = torch.randperm(self.lengths.numel(), generator=generator)
        order = order[: self.batches_per_epoch * self.batch_size]
        if self.bucket_pool_batches <= 1:
            return order.view(self.batches_per_epoch, self.batch_size)
        pool_size = self.bucket_pool_batches * self.batch_size
        pools = []
        for start in range(0, order.numel(), pool_size):
            pool = order[start : start + pool_size]
            # Stable sort keeps the shuffled order among equal lengths.
            pools.append(pool[torch.sort(self.lengths[pool], stable=True).indices])
        batches = torch.cat(pools).view(self.batches_per_epoch, self.batch_size)
        return batches[torch.randperm(self.batches_per_epoch, generator=generator)]

    def batch_indices(self, step: int) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._epoch_batches = epoch, self._batches_of_epoch(epoch)
        return self._epoch_batches[position].clone()  # the cache stays as drawn whatever the caller does
