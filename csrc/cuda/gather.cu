// gather_rows and scatter_add_rows on CUDA.
//
// Thread layout for all row kernels: blocks of (32, kRowsPerBlock) threads;
// threadIdx.y picks a row of the block's group, the 32 lanes stride along it,
// so each row is read and written by one warp in coalesced runs.
#include <cmath>
#include <cstdint>

#include "common/gather.h"
#include "cuda/cuda_check.cuh"

namespace fastmlm {

namespace {

constexpr int kRowsPerBlock = 8;

// The gather is a byte copy: Unit is the widest of 16/8/4/2/1-byte words that
// divides both base pointers, the row stride and the row length (chosen on
// the host), so rows aligned to 16 bytes move as uint4 vector loads.
template <typename Unit>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    gather_rows_kernel(const Unit* __restrict__ x, int64_t x_row_stride_units, const void* __restrict__ index,
                       int index_dtype, Unit* __restrict__ out, int64_t units_per_row, int64_t num_index,
                       int64_t num_rows, int dtype, int64_t width) {
  for (int64_t m = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y; m < num_index;
       m += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = load_index(index, index_dtype, m);
    if (!row_in_range(row, num_rows)) {  // value checks off: a NaN row, nothing read
      for (int64_t c = threadIdx.x; c < width; c += 32) store_float(out, dtype, m * width + c, NAN);
      continue;
    }
    const Unit* src = x + row * x_row_stride_units;
    Unit* dst = out + m * units_per_row;
    for (int64_t u = threadIdx.x; u < units_per_row; u += 32) dst[u] = src[u];
  }
}

template <typename Unit>
void launch_gather(const GatherRowsArgs& a, int64_t unit_bytes, cudaStream_t stream) {
  const int64_t element = dtype_size(a.dtype);
  const dim3 block(32, kRowsPerBlock);
  gather_rows_kernel<Unit><<<grid_blocks(a.num_index, kRowsPerBlock), block, 0, stream>>>(
      static_cast<const Unit*>(a.x), a.x_row_stride * element / unit_bytes, a.index, a.index_dtype,
      static_cast<Unit*>(a.out), a.width * element / unit_bytes, a.num_index, a.num_rows, a.dtype, a.width);
}

// Non-deterministic scatter: fp32 atomics into acc [N, D] (zeroed first).
template <int kDtype>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    scatter_add_atomic_kernel(const void* __restrict__ grad_out, int64_t grad_out_row_stride,
                              const void* __restrict__ index, int index_dtype, float* __restrict__ acc,
                              int64_t num_index, int64_t width, int64_t num_rows) {
  for (int64_t m = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y; m < num_index;
       m += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = load_index(index, index_dtype, m);
    if (!row_in_range(row, num_rows)) continue;  // its gradient goes nowhere
    float* dst = acc + row * width;
    const int64_t src = m * grad_out_row_stride;
    for (int64_t c = threadIdx.x; c < width; c += 32) atomicAdd(dst + c, load_float(grad_out, kDtype, src + c));
  }
}

// fp32 accumulator -> fp16/bf16 output, rounding as torch's `.to` does.
template <int kDtype>
__global__ void round_to_dtype_kernel(const float* __restrict__ acc, void* __restrict__ out, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    store_float(out, kDtype, i, acc[i]);
  }
}

// Deterministic scatter: sorted_index is the index sorted stably and order
// the permutation (order[s] = position in grad_out of sorted entry s). The
// first entry of each run of equal indices owns that output row and sums the
// run in sorted order, which is increasing m: 0 + g[m1] + g[m2] + ..., the
// same order as the CPU kernel, so the two agree bit for bit.
template <int kDtype>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    scatter_add_sorted_kernel(const void* __restrict__ grad_out, int64_t grad_out_row_stride,
                              const void* __restrict__ sorted_index, int index_dtype,
                              const int64_t* __restrict__ order, void* __restrict__ grad_x,
                              int64_t num_index, int64_t width, int64_t num_rows) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y; s < num_index;
       s += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = load_index(sorted_index, index_dtype, s);
    if (!row_in_range(row, num_rows)) continue;  // its gradient goes nowhere
    if (s > 0 && load_index(sorted_index, index_dtype, s - 1) == row) continue;  // not the run's first entry
    int64_t run_end = s + 1;
    while (run_end < num_index && load_index(sorted_index, index_dtype, run_end) == row) ++run_end;
    for (int64_t c = threadIdx.x; c < width; c += 32) {
      float sum = 0.0f;
      for (int64_t t = s; t < run_end; ++t) sum += load_float(grad_out, kDtype, order[t] * grad_out_row_stride + c);
      store_float(grad_x, kDtype, row * width + c, sum);
    }
  }
}

int64_t widest_unit(const GatherRowsArgs& a) {
  const int64_t element = dtype_size(a.dtype);
  const uint64_t combined = reinterpret_cast<uintptr_t>(a.x) | reinterpret_cast<uintptr_t>(a.out) |
                            static_cast<uint64_t>(a.x_row_stride * element) |
                            static_cast<uint64_t>(a.width * element);
  for (int64_t unit = 16; unit > 1; unit /= 2) {
    if (combined % unit == 0) return unit;
  }
  return 1;
}

}  // namespace

void gather_rows_cuda(const GatherRowsArgs& a, int device, uintptr_t stream) {
  if (a.num_index == 0 || a.width == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  switch (widest_unit(a)) {
    case 16: launch_gather<uint4>(a, 16, s); break;
    case 8: launch_gather<uint2>(a, 8, s); break;
    case 4: launch_gather<uint32_t>(a, 4, s); break;
    case 2: launch_gather<uint16_t>(a, 2, s); break;
    default: launch_gather<uint8_t>(a, 1, s); break;
  }
  FASTMLM_CUDA_CHECK_LAUNCH();
}

void scatter_add_rows_atomic_cuda(const ScatterAddRowsArgs& a, int device, uintptr_t stream) {
  const int64_t total = a.num_rows * a.width;
  if (total == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  float* acc = a.dtype == kFloat32 ? static_cast<float*>(a.grad_x) : a.accumulator;
  if (acc == nullptr) throw std::runtime_error("fastmlm._C: scatter_add_rows_atomic_cuda needs an fp32 accumulator");
  FASTMLM_CUDA_CHECK(cudaMemsetAsync(acc, 0, total * sizeof(float), s));
  const dim3 block(32, kRowsPerBlock);
  const unsigned blocks = grid_blocks(a.num_index, kRowsPerBlock);
  if (a.num_index > 0) {
    switch (a.dtype) {
      case kFloat16:
        scatter_add_atomic_kernel<kFloat16><<<blocks, block, 0, s>>>(a.grad_out, a.grad_out_row_stride, a.index,
                                                                     a.index_dtype, acc, a.num_index, a.width,
                                                                     a.num_rows);
        break;
      case kBFloat16:
        scatter_add_atomic_kernel<kBFloat16><<<blocks, block, 0, s>>>(a.grad_out, a.grad_out_row_stride, a.index,
                                                                      a.index_dtype, acc, a.num_index, a.width,
                                                                     a.num_rows);
        break;
      default:
        scatter_add_atomic_kernel<kFloat32><<<blocks, block, 0, s>>>(a.grad_out, a.grad_out_row_stride, a.index,
                                                                     a.index_dtype, acc, a.num_index, a.width,
                                                                     a.num_rows);
        break;
    }
    FASTMLM_CUDA_CHECK_LAUNCH();
  }
  if (a.dtype == kFloat16) {
    round_to_dtype_kernel<kFloat16><<<grid_blocks(total, 256), 256, 0, s>>>(acc, a.grad_x, total);
  } else if (a.dtype == kBFloat16) {
    round_to_dtype_kernel<kBFloat16><<<grid_blocks(total, 256), 256, 0, s>>>(acc, a.grad_x, total);
  }
  FASTMLM_CUDA_CHECK_LAUNCH();
}

void scatter_add_rows_sorted_cuda(const ScatterAddRowsArgs& a, int device, uintptr_t stream) {
  const int64_t total = a.num_rows * a.width;
  if (total == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  // Rows no index points to stay zero; every other row is written once.
  FASTMLM_CUDA_CHECK(cudaMemsetAsync(a.grad_x, 0, total * dtype_size(a.dtype), s));
  if (a.num_index == 0) return;
  const dim3 block(32, kRowsPerBlock);
  const unsigned blocks = grid_blocks(a.num_index, kRowsPerBlock);
  switch (a.dtype) {
    case kFloat16:
      scatter_add_sorted_kernel<kFloat16><<<blocks, block, 0, s>>>(a.grad_out, a.grad_out_row_stride, a.index,
                                                                   a.index_dtype, a.order, a.grad_x, a.num_index,
                                                                   a.width, a.num_rows);
      break;
    case kBFloat16:
      scatter_add_sorted_kernel<kBFloat16><<<blocks, block, 0, s>>>(a.grad_out, a.grad_out_row_stride, a.index,
                                                                    a.index_dtype, a.order, a.grad_x, a.num_index,
                                                                    a.width, a.num_rows);
      break;
    default:
      scatter_add_sorted_kernel<kFloat32><<<blocks, block, 0, s>>>(a.grad_out, a.grad_out_row_stride, a.index,
                                                                   a.index_dtype, a.order, a.grad_x, a.num_index,
                                                                   a.width, a.num_rows);
      break;
  }
  FASTMLM_CUDA_CHECK_LAUNCH();
}

}  // namespace fastmlm
