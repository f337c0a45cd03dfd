// The counter-based hash of fastmlm/reference/random.py, shared by the CPU
// and CUDA kernels (FASTMLM_HD functions compile for host and device), so the
// CPU tests exercise the very code the CUDA kernels run.
//
//   h = fmix32(lo32(seed) ^ 0x6A09E667 ^ (stream * 0x9E3779B9 mod 2**32))
//   h = fmix32(h ^ hi32(seed))
//   h = fmix32(h ^ a)
//   h = fmix32(h ^ b)
//
// Draws compare integers, never floats: an event of probability p happens when
// (h >> 8) < threshold24(p), and a uniform integer in [0, n) is (h * n) >> 32.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fastmlm {

constexpr uint32_t kHashInit = 0x6A09E667u;
constexpr uint32_t kHashGolden = 0x9E3779B9u;

// Streams (see fastmlm/reference/random.py): which random quantity a draw is for.
constexpr uint32_t kStreamSelect = 0;  // mask_tokens: is this position selected?
constexpr uint32_t kStreamAction = 1;  // mask_tokens: [MASK], random token or unchanged?
constexpr uint32_t kStreamToken = 2;   // mask_tokens: which random token?

// MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche.
FASTMLM_HD inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The first two rounds depend only on (seed, stream): a kernel computes this
// key once and finishes each position's hash with two more rounds.
FASTMLM_HD inline uint32_t hash_key(uint32_t seed_lo, uint32_t seed_hi, uint32_t stream) {
  uint32_t h = fmix32(seed_lo ^ kHashInit ^ (stream * kHashGolden));
  return fmix32(h ^ seed_hi);
}

FASTMLM_HD inline uint32_t hash_counter(uint32_t key, uint32_t a, uint32_t b) {
  return fmix32(fmix32(key ^ a) ^ b);
}

// counter_hash(seed, stream, a, b) of the reference, seed split into 32-bit words.
FASTMLM_HD inline uint32_t fastmlm_hash(uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                                        uint32_t a, uint32_t b) {
  return hash_counter(hash_key(seed_lo, seed_hi, stream), a, b);
}

// True with probability threshold24 / 2**24; threshold24 = floor(p * 2**24) is
// computed once in Python so every backend compares against the same integer.
FASTMLM_HD inline bool hash_below(uint32_t h, uint32_t threshold24) {
  return (h >> 8) < threshold24;
}

// Lemire's multiply-shift: uniform in [0, n) for n < 2**32, no division.
FASTMLM_HD inline uint32_t hash_uniform_int(uint32_t h, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(h) * n) >> 32);
}

}  // namespace fastmlm
