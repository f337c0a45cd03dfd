// mlm_cross_entropy on CUDA: the per-chunk passes over a block of logits the
// Python adapter has just produced with a cuBLAS matmul, and the finalize.
//
// Layout: one block of kThreads threads per row (grid-stride over rows). The
// threads stride along the row in coalesced runs; in the forward each thread
// reduces its logits to (max, sum of exp(z - max), sum of z), the partials are
// combined with warp shuffles and then across warps through shared memory,
// always in the same order, so results are deterministic; thread 0 folds the
// block's partial into the row's RowState. No atomics anywhere. The math
// (fast_exp, merge, finalize_row, logit_grad) is common/cross_entropy.h,
// the code the CPU kernels and tests run.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cross_entropy.h"
#include "cuda/cuda_check.cuh"

namespace fastmlm {
namespace cross_entropy {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
// Staging a narrowed dz row in shared memory (see chunk_backward_kernel) is
// bounded by the default 48 KiB of dynamic shared memory.
constexpr int64_t kMaxStagedBytes = 48 * 1024;

template <int kDtype>
__device__ __forceinline__ float load_logit(const void* row, int64_t j) {
  if constexpr (kDtype == kFloat16) return fp16_to_float(static_cast<const uint16_t*>(row)[j]);
  else if constexpr (kDtype == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(row)[j]);
  else return static_cast<const float*>(row)[j];
}

template <int kDtype>
__device__ __forceinline__ void store_grad(void* row, int64_t j, float v) {
  if constexpr (kDtype == kFloat16) static_cast<uint16_t*>(row)[j] = float_to_fp16(v);
  else if constexpr (kDtype == kBFloat16) static_cast<uint16_t*>(row)[j] = float_to_bf16(v);
  else static_cast<float*>(row)[j] = v;
}

__device__ __forceinline__ const void* logits_row(const ChunkArgs& a, int64_t row) {
  return static_cast<const char*>(a.logits) + row * a.logits_row_stride * dtype_size(a.logits_dtype);
}

__device__ __forceinline__ void* grad_row(const ChunkArgs& a, int64_t row) {
  return static_cast<char*>(a.grad_logits) + row * a.grad_row_stride * dtype_size(a.grad_dtype);
}

// Combines (max, sum_exp, logit_sum) across the 32 lanes; lane 0 ends with the total.
__device__ __forceinline__ void warp_reduce(float& max, float& sum_exp, float& logit_sum) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_max = __shfl_down_sync(kFullMask, max, offset);
    const float other_sum = __shfl_down_sync(kFullMask, sum_exp, offset);
    logit_sum += __shfl_down_sync(kFullMask, logit_sum, offset);
    merge_partial(max, sum_exp, other_max, other_sum);
  }
}

// Grid: blocks stride over rows. Block: kThreads threads along the row.
//   a.logits       [rows, cols] (row stride a.logits_row_stride elements, kDtype)
//   a.targets      int64 [rows];   a.state RowState [rows], read-modify-write
template <int kDtype>
__global__ void __launch_bounds__(kThreads) chunk_forward_kernel(ChunkArgs a) {
  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum[kWarps];
  __shared__ float warp_logit_sum[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const void* z = logits_row(a, row);
    // Two sweeps over the thread's logits (the second hits L1): the max first,
    // so each logit costs one exp instead of the two of an online update.
    float max = -INFINITY;
    for (int64_t j = threadIdx.x; j < a.cols; j += kThreads) {
      const float v = load_logit<kDtype>(z, j);
      max = v > max ? v : max;
    }
    float sum_exp = 0.0f;
    float logit_sum = 0.0f;
    for (int64_t j = threadIdx.x; j < a.cols; j += kThreads) {
      const float v = load_logit<kDtype>(z, j);
      sum_exp += fast_exp(v - max);
      logit_sum += v;
    }
    warp_reduce(max, sum_exp, logit_sum);
    if (lane == 0) {
      warp_max[warp] = max;
      warp_sum[warp] = sum_exp;
      warp_logit_sum[warp] = logit_sum;
    }
    __syncthreads();
    if (warp == 0) {
      max = lane < kWarps ? warp_max[lane] : -INFINITY;
      sum_exp = lane < kWarps ? warp_sum[lane] : 0.0f;
      logit_sum = lane < kWarps ? warp_logit_sum[lane] : 0.0f;
      warp_reduce(max, sum_exp, logit_sum);
      if (lane == 0) {
        RowState state = a.first_chunk ? initial_state() : a.state[row];
        merge(state, max, sum_exp, logit_sum);
        const int64_t target = a.targets[row];
        if (target != a.params.ignore_index && target >= a.col_start && target < a.col_start + a.cols) {
          state.target_logit = load_logit<kDtype>(z, target - a.col_start);
        }
        a.state[row] = state;
      }
    }
    __syncthreads();  // the warp_* arrays are reused by the next row
  }
}

// One thread per row.
__global__ void finalize_kernel(FinalizeArgs a) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    finalize_row(a.state[row], a.targets[row], a.params, &a.lse[row], &a.row_loss[row]);
  }
}

// dz over the chunk. kStage: the output is narrower than the input and lives
// in the same bytes (fp32 logits, fp16/bf16 dz), so the row's dz is staged in
// shared memory and written only after every thread has read its logits;
// rows never overlap, so only the block's own row needs this barrier.
//   a.logits [rows, cols] kIn;  a.grad_logits [rows, cols] kOut (may alias)
//   a.lse, a.grad_row_loss fp32 [rows];  a.targets int64 [rows]
template <int kIn, int kOut, bool kStage>
__global__ void __launch_bounds__(kThreads) chunk_backward_kernel(ChunkArgs a) {
  extern __shared__ uint16_t staged[];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t target = a.targets[row];
    void* out = grad_row(a, row);
    if (target == a.params.ignore_index) {
      // Zeros, not 0 * exp(...): an ignored row must not leak NaN/inf logits.
      for (int64_t j = threadIdx.x; j < a.cols; j += kThreads) store_grad<kOut>(out, j, 0.0f);
      continue;  // uniform across the block: no barrier is skipped by part of it
    }
    const RowGradCoeffs c = row_grad_coeffs(a.grad_row_loss[row], a.lse[row], target, a.params);
    const int64_t target_col = target - a.col_start;  // outside [0, cols): not in this chunk
    const void* z = logits_row(a, row);
    for (int64_t j = threadIdx.x; j < a.cols; j += kThreads) {
      float dz = logit_grad(load_logit<kIn>(z, j), c);
      if (j == target_col) dz -= c.target;
      if constexpr (kStage) store_grad<kOut>(staged, j, dz);
      else store_grad<kOut>(out, j, dz);
    }
    if constexpr (kStage) {
      __syncthreads();
      uint16_t* out16 = static_cast<uint16_t*>(out);
      for (int64_t j = threadIdx.x; j < a.cols; j += kThreads) out16[j] = staged[j];
      __syncthreads();  // `staged` is reused by the next row
    }
  }
}

void check_float_dtype(int dtype, const char* what) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument(std::string("cross_entropy (cuda): ") + what + " must be fp32, fp16 or bf16");
  }
}

template <int kIn, int kOut, bool kStage>
void launch_backward(const ChunkArgs& a, cudaStream_t stream) {
  const size_t shared = kStage ? static_cast<size_t>(a.cols) * sizeof(uint16_t) : 0;
  chunk_backward_kernel<kIn, kOut, kStage><<<grid_blocks(a.rows, 1), kThreads, shared, stream>>>(a);
}

}  // namespace

void cross_entropy_chunk_forward_cuda(const ChunkArgs& a, int device, uintptr_t stream) {
  check_float_dtype(a.logits_dtype, "logits");
  if (a.rows == 0) return;
  DeviceGuard guard(device);
  const unsigned grid = grid_blocks(a.rows, 1);
  switch (a.logits_dtype) {
    case kFloat16: chunk_forward_kernel<kFloat16><<<grid, kThreads, 0, as_stream(stream)>>>(a); break;
    case kBFloat16: chunk_forward_kernel<kBFloat16><<<grid, kThreads, 0, as_stream(stream)>>>(a); break;
    default: chunk_forward_kernel<kFloat32><<<grid, kThreads, 0, as_stream(stream)>>>(a); break;
  }
  FASTMLM_CUDA_CHECK_LAUNCH();
}

void cross_entropy_finalize_cuda(const FinalizeArgs& a, int device, uintptr_t stream) {
  if (a.rows == 0) return;
  DeviceGuard guard(device);
  finalize_kernel<<<grid_blocks(a.rows, 256), 256, 0, as_stream(stream)>>>(a);
  FASTMLM_CUDA_CHECK_LAUNCH();
}

void cross_entropy_chunk_backward_cuda(const ChunkArgs& a, int device, uintptr_t stream) {
  check_float_dtype(a.logits_dtype, "logits");
  check_float_dtype(a.grad_dtype, "grad_logits");
  if (a.rows == 0) return;
  const bool same = a.logits_dtype == a.grad_dtype;
  const bool narrowing = a.logits_dtype == kFloat32 && a.grad_dtype != kFloat32;
  if (!same && !narrowing) {
    throw std::invalid_argument("cross_entropy (cuda): dz must have the logits' dtype, or fp16/bf16 for fp32 logits");
  }
  if (narrowing && a.cols * static_cast<int64_t>(sizeof(uint16_t)) > kMaxStagedBytes) {
    throw std::invalid_argument("cross_entropy (cuda): a narrowing backward supports chunks of at most " +
                                std::to_string(kMaxStagedBytes / 2) + " columns, got " + std::to_string(a.cols));
  }
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  if (same) {
    switch (a.logits_dtype) {
      case kFloat16: launch_backward<kFloat16, kFloat16, false>(a, s); break;
      case kBFloat16: launch_backward<kBFloat16, kBFloat16, false>(a, s); break;
      default: launch_backward<kFloat32, kFloat32, false>(a, s); break;
    }
  } else if (a.grad_dtype == kFloat16) {
    launch_backward<kFloat32, kFloat16, true>(a, s);
  } else {
    launch_backward<kFloat32, kBFloat16, true>(a, s);
  }
  FASTMLM_CUDA_CHECK_LAUNCH();
}

}  // namespace cross_entropy
}  // namespace fastmlm
