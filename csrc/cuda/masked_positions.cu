// masked_positions on CUDA: stream compaction in three launches, no host sync.
//   1. count_kernel: one block per tile of kTile labels writes the tile's
//      number of kept labels to workspace[tile].
//   2. scan_kernel: one block turns workspace into exclusive tile offsets
//      (looping over the tiles kBlock at a time) and writes the true count.
//   3. write_kernel: each block rescans its tile in order (kItems sub-tiles of
//      kBlock labels, a block scan each), writes positions below the capacity,
//      and the whole grid zeroes index[min(count, capacity):capacity].
// Simpler than a decoupled look-back single pass, and at BERT sizes (tens of
// thousands of labels) all three launches are latency, not bandwidth.
#include <cstdint>

#include "common/masking.h"
#include "cuda/block_scan.cuh"
#include "cuda/cuda_check.cuh"

namespace fastmlm {

namespace {

constexpr int kBlock = 256;
constexpr int kItems = 8;
constexpr int64_t kTile = kBlock * kItems;

__global__ void __launch_bounds__(kBlock) count_kernel(MaskedPositionsArgs a, int64_t* tile_counts,
                                                       int64_t num_tiles) {
  __shared__ BlockScanStorage<kBlock> scan;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    int64_t kept = 0;
    for (int item = 0; item < kItems; ++item) {
      const int64_t i = tile * kTile + item * kBlock + threadIdx.x;
      if (i < a.numel) kept += is_kept_label(a, i);
    }
    int64_t tile_total;
    block_exclusive_scan<kBlock>(kept, scan, &tile_total);
    if (threadIdx.x == 0) tile_counts[tile] = tile_total;
  }
}

__global__ void __launch_bounds__(kBlock) scan_kernel(MaskedPositionsArgs a, int64_t* tile_offsets,
                                                      int64_t num_tiles) {
  __shared__ BlockScanStorage<kBlock> scan;
  int64_t running = 0;
  for (int64_t start = 0; start < num_tiles; start += kBlock) {
    const int64_t tile = start + threadIdx.x;
    const int64_t value = tile < num_tiles ? tile_offsets[tile] : 0;
    int64_t chunk_total;
    const int64_t before = block_exclusive_scan<kBlock>(value, scan, &chunk_total);
    if (tile < num_tiles) tile_offsets[tile] = running + before;
    running += chunk_total;
  }
  if (threadIdx.x == 0) *a.count = running;
}

__global__ void __launch_bounds__(kBlock) write_kernel(MaskedPositionsArgs a, const int64_t* tile_offsets,
                                                       int64_t num_tiles) {
  __shared__ BlockScanStorage<kBlock> scan;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    int64_t out = tile_offsets[tile];
    if (out >= a.capacity) continue;  // uniform across the block: the whole tile lies past the capacity
    for (int item = 0; item < kItems; ++item) {
      const int64_t i = tile * kTile + item * kBlock + threadIdx.x;
      const bool kept = i < a.numel && is_kept_label(a, i);
      int64_t sub_total;
      const int64_t position = out + block_exclusive_scan<kBlock>(kept, scan, &sub_total);
      if (kept && position < a.capacity) a.index[position] = i;
      out += sub_total;
    }
  }
  // Zero the unused tail so every entry is a valid row for a later gather.
  const int64_t total = *a.count;
  const int64_t tail_begin = total < a.capacity ? total : a.capacity;
  for (int64_t j = tail_begin + blockIdx.x * static_cast<int64_t>(kBlock) + threadIdx.x; j < a.capacity;
       j += static_cast<int64_t>(gridDim.x) * kBlock) {
    a.index[j] = 0;
  }
}

int64_t num_tiles_for(int64_t numel) { return numel == 0 ? 1 : (numel + kTile - 1) / kTile; }

}  // namespace

int64_t masked_positions_workspace_elems(int64_t numel) { return num_tiles_for(numel); }

void masked_positions_cuda(const MaskedPositionsArgs& a, int64_t* workspace, int device, uintptr_t stream) {
  DeviceGuard guard(device);
  const int64_t num_tiles = num_tiles_for(a.numel);
  const unsigned blocks = grid_blocks(num_tiles, 1);
  cudaStream_t s = as_stream(stream);
  count_kernel<<<blocks, kBlock, 0, s>>>(a, workspace, num_tiles);
  FASTMLM_CUDA_CHECK_LAUNCH();
  scan_kernel<<<1, kBlock, 0, s>>>(a, workspace, num_tiles);
  FASTMLM_CUDA_CHECK_LAUNCH();
  // Enough blocks for the tail too when the capacity exceeds the labels.
  const int64_t tail_blocks = (a.capacity + kBlock - 1) / kBlock;
  const unsigned write_blocks = grid_blocks(num_tiles > tail_blocks ? num_tiles : tail_blocks, 1);
  write_kernel<<<write_blocks, kBlock, 0, s>>>(a, workspace, num_tiles);
  FASTMLM_CUDA_CHECK_LAUNCH();
}

}  // namespace fastmlm
