"""Triton version of the shared counter-based hash (`fastmlm/reference/random.py`).

Every function here works on uint32 tensors (or scalars) inside a kernel and
returns the same bits as the reference, so a random decision made in a
forward kernel can be remade, not stored, in the backward kernel.

The chain is split so kernels can hoist the expensive parts:

    prefix   = counter_hash_prefix(seed_lo, seed_hi, stream)   once per program
    row_hash = fmix32(prefix ^ a)                              once per row
    hash     = fmix32(row_hash ^ b)                            per element

so `counter_hash(seed_lo, seed_hi, stream, a, b)` costs one `fmix32` per
element once the prefix and row hashes are known.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Same constants as the reference; uint32 arithmetic wraps in Triton, so no
# masking is needed here (the reference emulates uint32 in int64). constexpr:
# jitted code may only read globals declared so.
GOLDEN = tl.constexpr(0x9E3779B9)
INIT = tl.constexpr(0x6A09E667)


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finaliser; `x` is uint32, shifts are logical."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def counter_hash_prefix(seed_lo, seed_hi, stream):
    """The part of `counter_hash` that depends on (seed, stream) only.

    `seed_lo`/`seed_hi` are the low/high 32-bit words of the seed, `stream` the
    stream number. `tl.cast` (not `.to`) because a kernel's int argument equal
    to 0 or 1 may arrive specialised as a constexpr, which has no `.to`.
    """
    seed_lo = tl.cast(seed_lo, tl.uint32)
    seed_hi = tl.cast(seed_hi, tl.uint32)
    stream = tl.cast(stream, tl.uint32)
    init = tl.full((), INIT, tl.uint32)
    h = fmix32(seed_lo ^ init ^ (stream * GOLDEN))
    return fmix32(h ^ seed_hi)


@triton.jit
def load_seed_words(seed_ptr):
    """(seed_lo, seed_hi): the uint32 words of the int64 seed at `seed_ptr`.

    The seed is read in the kernel, not passed as a scalar argument, so a
    seed drawn on the GPU never travels to the host and a CUDA graph replays
    whatever value the seed tensor holds at launch. int64 -> uint32 casts
    truncate, so the high word needs no mask after the (arithmetic) shift.
    """
    seed = tl.load(seed_ptr).to(tl.int64)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def counter_hash(seed_lo, seed_hi, stream, a, b):
    """uint32 hash of (seed, stream, a, b), bit-identical to the reference.

    `a` and `b` are uint32 (or castable) tensors that broadcast against each other.
    """
    prefix = counter_hash_prefix(seed_lo, seed_hi, stream)
    h = fmix32(prefix ^ tl.cast(a, tl.uint32))
    return fmix32(h ^ tl.cast(b, tl.uint32))


@triton.jit
def keep_mask(row_hash, cols, drop_threshold):
    """True where an element survives dropout.

    `row_hash` is `fmix32(prefix ^ row)` for each row, shape [M]; `cols` the
    column counters, shape [N]; `drop_threshold` is threshold24(p) (uint32 or
    int32). Returns a [M, N] boolean: kept when `(hash >> 8) >= threshold`,
    the complement of the reference's drop event `(hash >> 8) < threshold`.
    """
    h = fmix32(row_hash[:, None] ^ tl.cast(cols, tl.uint32)[None, :])
    return (h >> 8) >= tl.cast(drop_threshold, tl.uint32)
