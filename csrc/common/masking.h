// mask_tokens and masked_positions (docs/ops.md): the argument structs the
// bindings fill, the per-position decisions shared by the CPU and CUDA
// kernels, and the entry points of csrc/cpu/{mask_tokens,masked_positions}.cpp
// and csrc/cuda/{mask_tokens,masked_positions}.cu.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/hash.h"
#include "common/host_device.h"

namespace fastmlm {

constexpr int64_t kIgnoreLabel = -100;

// A strided 2-D view [rows, cols] of an integer or bool tensor; strides in
// elements. data == nullptr means "not given" (every position passes).
struct IntMatrix {
  const void* data = nullptr;
  int dtype = kInt64;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

FASTMLM_HD inline int64_t load_int(const IntMatrix& m, int64_t row, int64_t col) {
  const int64_t offset = row * m.row_stride + col * m.col_stride;
  switch (m.dtype) {
    case kInt64: return static_cast<const int64_t*>(m.data)[offset];
    case kInt32: return static_cast<const int32_t*>(m.data)[offset];
    case kInt8: return static_cast<const int8_t*>(m.data)[offset];
    default: return static_cast<const uint8_t*>(m.data)[offset];  // bool, uint8
  }
}

struct MaskTokensArgs {
  IntMatrix input_ids;           // int32 or int64 [batch, length]
  IntMatrix special_tokens_mask; // eligible needs == 0 (optional)
  IntMatrix attention_mask;      // eligible needs != 0 (optional)
  void* masked_ids = nullptr;    // contiguous [batch, length], input_ids' dtype
  int64_t* labels = nullptr;     // contiguous [batch, length]
  int64_t batch = 0;
  int64_t length = 0;
  int64_t mask_token_id = 0;
  uint32_t vocab_size = 1;
  uint32_t seed_lo = 0;
  uint32_t seed_hi = 0;
  uint32_t select_threshold = 0;  // threshold24(mlm_probability), bernoulli budget
  uint32_t mask_threshold = 0;    // threshold24(0.8)
  uint32_t random_threshold = 0;  // threshold24(0.9)
  double mlm_probability = 0.0;   // exact budget: k = floor(p * n_eligible + 0.5)
  bool exact = false;
};

FASTMLM_HD inline bool is_eligible(const MaskTokensArgs& a, int64_t row, int64_t col) {
  if (a.special_tokens_mask.data && load_int(a.special_tokens_mask, row, col) != 0) return false;
  if (a.attention_mask.data && load_int(a.attention_mask, row, col) == 0) return false;
  return true;
}

// k = floor(p * n + 0.5) in float64, rounding after the product and after the
// sum exactly as the float64 reference does (no fused multiply-add: CUDA gets
// explicit round-to-nearest intrinsics, the host build uses -ffp-contract=off).
FASTMLM_HD inline int64_t exact_budget(double p, int64_t n) {
#if defined(__CUDA_ARCH__)
  const double k = floor(__dadd_rn(__dmul_rn(p, static_cast<double>(n)), 0.5));
#else
  const double product = p * static_cast<double>(n);
  const double k = floor(product + 0.5);
#endif
  return k > static_cast<double>(n) ? n : static_cast<int64_t>(k);
}

// The token written at a selected position: [MASK] (80%), a random token
// (10%) or the original (10%), decided by the action and token streams.
FASTMLM_HD inline int64_t replacement_token(const MaskTokensArgs& a, uint32_t action_key,
                                            uint32_t token_key, int64_t row, int64_t col,
                                            int64_t original) {
  const uint32_t action = hash_counter(action_key, static_cast<uint32_t>(row), static_cast<uint32_t>(col));
  if (hash_below(action, a.mask_threshold)) return a.mask_token_id;
  if (hash_below(action, a.random_threshold)) {
    const uint32_t h = hash_counter(token_key, static_cast<uint32_t>(row), static_cast<uint32_t>(col));
    return hash_uniform_int(h, a.vocab_size);
  }
  return original;
}

// Writes masked_ids and labels at one position once selection is decided.
FASTMLM_HD inline void write_masked(const MaskTokensArgs& a, uint32_t action_key, uint32_t token_key,
                                    int64_t row, int64_t col, bool selected) {
  const int64_t original = load_int(a.input_ids, row, col);
  const int64_t out = selected ? replacement_token(a, action_key, token_key, row, col, original) : original;
  const int64_t flat = row * a.length + col;
  if (a.input_ids.dtype == kInt32) {
    static_cast<int32_t*>(a.masked_ids)[flat] = static_cast<int32_t>(out);
  } else {
    static_cast<int64_t*>(a.masked_ids)[flat] = out;
  }
  a.labels[flat] = selected ? original : kIgnoreLabel;
}

struct MaskedPositionsArgs {
  const void* labels = nullptr;  // contiguous, numel entries, int32 or int64
  int labels_dtype = kInt64;
  int64_t numel = 0;
  int64_t ignore_index = kIgnoreLabel;
  int64_t* index = nullptr;      // capacity entries: positions, then zeros
  int64_t capacity = 0;
  int64_t* count = nullptr;      // one entry: the true count
};

FASTMLM_HD inline bool is_kept_label(const MaskedPositionsArgs& a, int64_t i) {
  const int64_t value = a.labels_dtype == kInt32 ? static_cast<const int32_t*>(a.labels)[i]
                                                 : static_cast<const int64_t*>(a.labels)[i];
  return value != a.ignore_index;
}

void mask_tokens_cpu(const MaskTokensArgs& args);
void masked_positions_cpu(const MaskedPositionsArgs& args);

#if defined(FASTMLM_WITH_CUDA)
void mask_tokens_cuda(const MaskTokensArgs& args, int device, uintptr_t stream);
// workspace: masked_positions_workspace_elems(numel) int64 entries on the device.
int64_t masked_positions_workspace_elems(int64_t numel);
void masked_positions_cuda(const MaskedPositionsArgs& args, int64_t* workspace, int device,
                           uintptr_t stream);
#endif

}  // namespace fastmlm
