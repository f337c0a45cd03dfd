// mask_tokens on CUDA (docs/ops.md), no host round trip in either budget.
//
// bernoulli: one thread per position; selection is a pure function of
//   (seed, row, column).
// exact: one block of kMaskBlock threads per row. The row's k smallest keys
//   (hash, column) are found by a radix select on the 32-bit select hash, most
//   significant byte first: four passes, each a 256-bin shared-memory
//   histogram of the eligible hashes that still match the chosen prefix; the
//   bin holding the k-th smallest fixes the next byte, giving the k-th
//   smallest hash T. Hashes in a row never tie: for a fixed (seed, stream,
//   row) the hash is fmix32(c ^ column) with fmix32 a bijection, so distinct
//   columns (< 2**32) have distinct hashes, the column part of the key never
//   decides, and the selection is exactly "eligible and hash <= T".
//   Hashes are recomputed in each pass instead of stored: a hash costs a few
//   integer ops, so the kernel needs no shared memory proportional to the row
//   length and serves any length in O(length / threads) per pass.
#include <cstdint>

#include "common/masking.h"
#include "cuda/block_scan.cuh"
#include "cuda/cuda_check.cuh"

namespace fastmlm {

namespace {

constexpr int kMaskBlock = 256;  // also the radix histogram size: one bin per thread

struct StreamKeys {
  uint32_t select;
  uint32_t action;
  uint32_t token;
};

__global__ void mask_tokens_bernoulli_kernel(MaskTokensArgs a, StreamKeys keys) {
  const int64_t total = a.batch * a.length;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / a.length;
    const int64_t col = i - row * a.length;
    bool selected = false;
    if (is_eligible(a, row, col)) {
      const uint32_t h = hash_counter(keys.select, static_cast<uint32_t>(row), static_cast<uint32_t>(col));
      selected = hash_below(h, a.select_threshold);
    }
    write_masked(a, keys.action, keys.token, row, col, selected);
  }
}

__device__ inline uint32_t select_hash(const StreamKeys& keys, int64_t row, int64_t col) {
  return hash_counter(keys.select, static_cast<uint32_t>(row), static_cast<uint32_t>(col));
}

__global__ void __launch_bounds__(kMaskBlock) mask_tokens_exact_kernel(MaskTokensArgs a, StreamKeys keys) {
  __shared__ BlockScanStorage<kMaskBlock> scan;
  __shared__ unsigned int histogram[kMaskBlock];
  __shared__ uint32_t chosen_prefix;
  __shared__ int64_t chosen_remaining;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < a.batch; row += gridDim.x) {
    int64_t local_eligible = 0;
    for (int64_t col = tid; col < a.length; col += kMaskBlock) local_eligible += is_eligible(a, row, col);
    int64_t n_eligible;
    block_exclusive_scan<kMaskBlock>(local_eligible, scan, &n_eligible);
    const int64_t k = exact_budget(a.mlm_probability, n_eligible);

    // Selected: eligible and hash <= T. k == n_eligible: T = 2**32 - 1 takes
    // every eligible position; k == 0: nothing (checked separately, as no T
    // excludes the hash 0).
    uint32_t threshold_hash = 0xFFFFFFFFu;
    if (k > 0 && k < n_eligible) {
      uint32_t prefix = 0;
      uint32_t prefix_mask = 0;
      int64_t remaining = k;  // rank (1-based) of the k-th smallest among the hashes matching the prefix
      for (int shift = 24; shift >= 0; shift -= 8) {
        histogram[tid] = 0u;
        __syncthreads();
        for (int64_t col = tid; col < a.length; col += kMaskBlock) {
          if (!is_eligible(a, row, col)) continue;
          const uint32_t h = select_hash(keys, row, col);
          if ((h & prefix_mask) == prefix) atomicAdd(&histogram[(h >> shift) & 0xFFu], 1u);
        }
        __syncthreads();
        const int64_t bin_count = histogram[tid];
        int64_t matching;
        const int64_t below = block_exclusive_scan<kMaskBlock>(bin_count, scan, &matching);
        if (below < remaining && remaining <= below + bin_count) {  // exactly one bin
          chosen_prefix = prefix | (static_cast<uint32_t>(tid) << shift);
          chosen_remaining = remaining - below;
        }
        __syncthreads();
        prefix = chosen_prefix;
        remaining = chosen_remaining;
        prefix_mask |= 0xFFu << shift;
      }
      threshold_hash = prefix;
    }

    for (int64_t col = tid; col < a.length; col += kMaskBlock) {
      const bool selected = k > 0 && is_eligible(a, row, col) && select_hash(keys, row, col) <= threshold_hash;
      write_masked(a, keys.action, keys.token, row, col, selected);
    }
    // chosen_prefix is rewritten by the next row's select: wait until all read it.
    __syncthreads();
  }
}

}  // namespace

void mask_tokens_cuda(const MaskTokensArgs& a, int device, uintptr_t stream) {
  if (a.batch == 0 || a.length == 0) return;
  DeviceGuard guard(device);
  const StreamKeys keys{hash_key(a.seed_lo, a.seed_hi, kStreamSelect),
                        hash_key(a.seed_lo, a.seed_hi, kStreamAction),
                        hash_key(a.seed_lo, a.seed_hi, kStreamToken)};
  if (a.exact) {
    const unsigned blocks = static_cast<unsigned>(a.batch < kMaxGridBlocks ? a.batch : kMaxGridBlocks);
    mask_tokens_exact_kernel<<<blocks, kMaskBlock, 0, as_stream(stream)>>>(a, keys);
  } else {
    mask_tokens_bernoulli_kernel<<<grid_blocks(a.batch * a.length, 256), 256, 0, as_stream(stream)>>>(a, keys);
  }
  FASTMLM_CUDA_CHECK_LAUNCH();
}

}  // namespace fastmlm
