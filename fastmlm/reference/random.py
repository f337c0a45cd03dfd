"""Counter-based random numbers shared by every backend.

Each random draw is a pure function of (seed, stream, a, b): no generator
state, so the CPU, CUDA and Triton kernels and this reference produce the same
bits for the same position, in any order and on any device, without host
synchronisation. The same function exists as `fastmlm_hash` in
`csrc/common/hash.h` (C++/CUDA) and as `counter_hash` in
`fastmlm/kernels/triton/random.py` (Triton).

The construction is a chain of MurmurHash3's 32-bit finaliser (a bijection on
uint32 with full avalanche), fed one 32-bit word at a time:

    h = fmix32(lo32(seed) ^ 0x6A09E667 ^ (stream * 0x9E3779B9 mod 2**32))
    h = fmix32(h ^ hi32(seed))
    h = fmix32(h ^ a)
    h = fmix32(h ^ b)

Draws compare integers, never floats, so no backend can round differently:
an event of probability p happens when `(h >> 8) < threshold24(p)`, and a
token id uniform in [0, n) is `(h * n) >> 32` (Lemire's multiply-shift).

Here uint32 arithmetic is emulated in int64 tensors: every value is kept in
[0, 2**32); a product of two such values may wrap in int64, but wrapping keeps
the low 32 bits exact, which is all `& MASK32` keeps.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
INIT = 0x6A09E667

# Streams: which independent random quantity a draw is for.
STREAM_SELECT = 0  # mask_tokens: is this position selected?
STREAM_ACTION = 1  # mask_tokens: [MASK], random token or unchanged?
STREAM_TOKEN = 2  # mask_tokens: which random token?
STREAM_DROPOUT = 0x100  # attention dropout: stream = STREAM_DROPOUT + head


def threshold24(p: float) -> int:
    """Integer threshold t with P[(h >> 8) < t] = t / 2**24, t = floor(p * 2**24)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    return int(p * (1 << 24))


def split_seed(seed: int | torch.Tensor) -> tuple[int, int] | tuple[torch.Tensor, torch.Tensor]:
    """The low and high 32-bit words of a seed taken modulo 2**64.

    An int gives two ints. A 0-d int64 tensor (the seed's two's-complement
    bits, as `torch.randint` on a device draws it) gives two int64 tensors on
    its device, with no host read, so a seed drawn on the GPU stays there.
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        # int64 >> is arithmetic: mask after shifting, or a negative seed's
        # high word would carry sign bits.
        return seed & MASK32, (seed >> 32) & MASK32
    seed %= 1 << 64
    return seed & MASK32, seed >> 32


def seed_to_int64(seed: int) -> int:
    """The int64 with the same bits as `seed` mod 2**64: the value of a seed tensor."""
    seed %= 1 << 64
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def seed_tensor(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A seed as the 0-d int64 tensor on `device` that the ops and kernels take.

    An int is folded by `seed_to_int64` and written by `torch.full` (a fill
    kernel: no host-to-device copy to wait for, and a constant under
    torch.compile). A tensor is used as it is, so a seed drawn on the device
    is never read on the host; a CPU one is copied without waiting.
    """
    device = torch.device(device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise ValueError(f"a seed tensor must be 0-d int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        if seed.device != device:
            if seed.device.type != "cpu":
                raise ValueError(f"the seed is on {seed.device}, the tensors it seeds on {device}: "
                                 "pass it on their device or on the CPU")
            seed = seed.to(device, non_blocking=True)
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a 0-d int64 tensor, got {type(seed).__name__}")
    return torch.full((), seed_to_int64(seed), dtype=torch.int64, device=device)


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def counter_hash(seed: int | torch.Tensor, stream: int | torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """uint32 hash of (seed, stream, a, b) as an int64 tensor; a and b broadcast.

    `seed` is an int or a 0-d int64 tensor (same bits for the same value mod 2**64).
    """
    lo, hi = split_seed(seed)
    if isinstance(seed, torch.Tensor):
        lo, hi = lo.to(a.device), hi.to(a.device)
    if isinstance(stream, torch.Tensor):
        mixed_stream = (stream.to(torch.int64) * GOLDEN) & MASK32
    else:
        mixed_stream = (stream * GOLDEN) & MASK32
    a = a.to(torch.int64) & MASK32
    b = b.to(torch.int64) & MASK32
    h = fmix32(torch.as_tensor(lo ^ INIT, dtype=torch.int64, device=a.device) ^ mixed_stream)
    h = fmix32(h ^ hi)
    h = fmix32(h ^ a)
    return fmix32(h ^ b)


def bernoulli_from_hash(h: torch.Tensor, p: float) -> torch.Tensor:
    """True with probability floor(p * 2**24) / 2**24."""
    return (h >> 8) < threshold24(p)


def uniform_int_from_hash(h: torch.Tensor, n: int) -> torch.Tensor:
    """An integer in [0, n), n < 2**31, by multiply-shift (no modulo bias worth naming)."""
    return (h * n) >> 32
