// Block-wide scans for blocks of kBlock threads (a multiple of 32, at most
// 1024): warp shuffles within each warp, then one warp scans the warp totals.
#pragma once

#include <cstdint>

namespace fastmlm {

// Shared scratch for block_exclusive_scan: one slot per warp plus the total.
template <int kBlock>
struct BlockScanStorage {
  int64_t warp_totals[kBlock / 32];
  int64_t block_total;
};

// Returns the sum of `value` over threads with a smaller threadIdx.x and sets
// *total to the sum over the block. Every thread of the block must call it;
// it synchronises the block before returning, so storage can be reused.
template <int kBlock>
__device__ inline int64_t block_exclusive_scan(int64_t value, BlockScanStorage<kBlock>& storage,
                                               int64_t* total) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block size");
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int64_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) storage.warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t warp_sum = lane < kWarps ? storage.warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int64_t other = __shfl_up_sync(0xFFFFFFFFu, warp_sum, offset);
      if (lane >= offset) warp_sum += other;
    }
    // Turn inclusive warp sums into exclusive warp offsets.
    if (lane < kWarps) storage.warp_totals[lane] = warp_sum - storage.warp_totals[lane];
    if (lane == kWarps - 1) storage.block_total = warp_sum;
  }
  __syncthreads();
  const int64_t result = storage.warp_totals[warp] + inclusive - value;
  *total = storage.block_total;
  __syncthreads();
  return result;
}

}  // namespace fastmlm
