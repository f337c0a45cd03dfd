// gather_rows and its backward scatter_add_rows (docs/ops.md): argument
// structs and the entry points of csrc/cpu/gather.cpp and csrc/cuda/gather.cu.
//
// The gather is a copy of whole rows, so it works on bytes and does not care
// about the float type; the scatter accumulates in fp32 whatever the dtype.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/host_device.h"

namespace fastmlm {

FASTMLM_HD inline int64_t load_index(const void* index, int index_dtype, int64_t i) {
  return index_dtype == kInt32 ? static_cast<const int32_t*>(index)[i]
                               : static_cast<const int64_t*>(index)[i];
}

FASTMLM_HD inline float load_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

FASTMLM_HD inline void store_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); break;
    case kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

struct GatherRowsArgs {
  const void* x = nullptr;   // [N, D], unit column stride
  int64_t x_row_stride = 0;  // elements
  int dtype = kFloat32;
  const void* index = nullptr;  // [M], values in [0, N) (checked by the op layer)
  int index_dtype = kInt64;
  void* out = nullptr;       // contiguous [M, D]
  int64_t num_index = 0;     // M
  int64_t width = 0;         // D
  int64_t num_rows = 0;      // N: an index outside [0, N) (value checks off) gives a NaN row, reads nothing
};

// An index the op layer did not check (value checks off) may lie outside
// [0, N): the kernels read and write nothing for it.
FASTMLM_HD inline bool row_in_range(int64_t row, int64_t num_rows) { return row >= 0 && row < num_rows; }

struct ScatterAddRowsArgs {
  const void* grad_out = nullptr;  // [M, D], unit column stride
  int64_t grad_out_row_stride = 0; // elements
  int dtype = kFloat32;
  const void* index = nullptr;     // [M] int32/int64; for the sorted CUDA path: sorted values
  int index_dtype = kInt64;
  const int64_t* order = nullptr;  // sorted CUDA path: grad_out row of each sorted entry
  void* grad_x = nullptr;          // contiguous [N, D], fully written (zeros where no index points)
  float* accumulator = nullptr;    // atomic CUDA path, fp16/bf16: fp32 [N, D] scratch
  int64_t num_index = 0;           // M
  int64_t num_rows = 0;            // N
  int64_t width = 0;               // D
};

void gather_rows_cpu(const GatherRowsArgs& args);
// Fixed summation order (increasing position in index) for every dtype.
void scatter_add_rows_cpu(const ScatterAddRowsArgs& args);

#if defined(FASTMLM_WITH_CUDA)
void gather_rows_cuda(const GatherRowsArgs& args, int device, uintptr_t stream);
// fp32 atomics into the accumulator (grad_x itself for fp32), then one
// rounding to the output dtype. Summation order varies from run to run.
void scatter_add_rows_atomic_cuda(const ScatterAddRowsArgs& args, int device, uintptr_t stream);
// No atomics: index holds the indices sorted (stably), order the permutation;
// each run of equal indices is summed in sorted order by one thread per column.
void scatter_add_rows_sorted_cuda(const ScatterAddRowsArgs& args, int device, uintptr_t stream);
#endif

}  // namespace fastmlm
