// Dtype tags passed from Python (fastmlm/_ext.py: dtype_tag) and conversions
// between float and fp16/bf16 written as bit manipulation, so the same code
// runs on the host (no cuda_fp16.h there) and the device, and both round the
// way torch's `.to(dtype)` does: round to nearest, ties to even.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace fastmlm {

// Must match fastmlm/_ext.py (_DTYPE_TAGS).
enum DtypeTag : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kBool = 5,   // one byte, nonzero is true
  kUInt8 = 6,
  kInt8 = 7,
};

FASTMLM_HD inline int dtype_size(int tag) {
  switch (tag) {
    case kFloat32: case kInt32: return 4;
    case kFloat16: case kBFloat16: return 2;
    case kInt64: return 8;
    case kBool: case kUInt8: case kInt8: return 1;
    default: return 0;
  }
}

FASTMLM_HD inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FASTMLM_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// bf16 is the top half of an fp32: widening is exact.
FASTMLM_HD inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// As c10::BFloat16: NaN becomes the quiet NaN 0x7FC0; otherwise add half an
// ulp of bf16, plus one when the kept part is odd (ties to even), and truncate.
FASTMLM_HD inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

FASTMLM_HD inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal: value = mantissa * 2**-24, exact in fp32.
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// IEEE fp32 -> fp16, round to nearest even, overflow to inf, NaN to 0x7E00
// (as torch). Works on the fp32 bits: shift the 24-bit significand right by
// the exponent difference and round on the shifted-out bits.
FASTMLM_HD inline uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return sign | 0x7E00u;                        // NaN
  if (abs_bits >= 0x477FF000u) return sign | 0x7C00u;                       // rounds to >= 65520: inf
  if (abs_bits < 0x33000000u) return sign;                                  // < 2**-25: rounds to 0
  const int exponent = static_cast<int>(abs_bits >> 23) - 127;
  uint32_t significand = (abs_bits & 0x7FFFFFu) | 0x800000u;                // 1.m as 24 bits
  // Normal fp16 keeps 11 significant bits (shift 13); subnormals (exponent <
  // -14) keep fewer, down to 1 bit at 2**-24.
  const int shift = exponent < -14 ? 13 + (-14 - exponent) : 13;
  const uint32_t kept = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  uint32_t rounded = kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
  if (exponent < -14) return sign | static_cast<uint16_t>(rounded);         // subnormal (may round up to normal)
  // Normal: biased exponent in the high bits; a carry out of the significand
  // bumps the exponent, which is exactly right.
  return sign | static_cast<uint16_t>(((static_cast<uint32_t>(exponent + 14)) << 10) + rounded);
}

}  // namespace fastmlm
