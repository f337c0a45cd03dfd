// gather_rows and scatter_add_rows on the CPU.
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/gather.h"

namespace fastmlm {

// Rows are contiguous runs of width * element bytes: one memcpy each.
void gather_rows_cpu(const GatherRowsArgs& a) {
  const int64_t element = dtype_size(a.dtype);
  const int64_t row_bytes = a.width * element;
  const char* x = static_cast<const char*>(a.x);
  char* out = static_cast<char*>(a.out);
  // Threads pay off only past a few MB (a one-thread memcpy moves ~5-10 GB/s).
#pragma omp parallel for schedule(static) if (a.num_index * row_bytes >= (1 << 22))
  for (int64_t m = 0; m < a.num_index; ++m) {
    const int64_t row = load_index(a.index, a.index_dtype, m);
    if (!row_in_range(row, a.num_rows)) {
      for (int64_t c = 0; c < a.width; ++c) store_float(a.out, a.dtype, m * a.width + c, NAN);
      continue;
    }
    std::memcpy(out + m * row_bytes, x + row * a.x_row_stride * element, row_bytes);
  }
}

namespace {

// Sums the index positions listed for one output row (increasing m) in fp32
// and writes the row once, rounded to the output dtype.
template <int kDtype>
void sum_row(const ScatterAddRowsArgs& a, int64_t row, int64_t first, const std::vector<int64_t>& next,
             std::vector<float>& acc) {
  std::fill(acc.begin(), acc.end(), 0.0f);
  for (int64_t m = first; m >= 0; m = next[m]) {
    const int64_t src = m * a.grad_out_row_stride;
    for (int64_t c = 0; c < a.width; ++c) acc[c] += load_float(a.grad_out, kDtype, src + c);
  }
  for (int64_t c = 0; c < a.width; ++c) store_float(a.grad_x, kDtype, row * a.width + c, acc[c]);
}

}  // namespace

// Deterministic and output-row parallel: a counting pass links, for every
// output row, the index positions that point to it in increasing order; then
// each output row is written exactly once, either zeros or the fp32 sum
// 0 + g[m1] + g[m2] + ... (m1 < m2 < ...) rounded once, whatever the thread
// count. No [N, D] fp32 scratch, so the output is the only large write.
void scatter_add_rows_cpu(const ScatterAddRowsArgs& a) {
  const int64_t element = dtype_size(a.dtype);
  std::vector<int64_t> first(a.num_rows, -1), last(a.num_rows, -1), next(a.num_index, -1);
  for (int64_t m = 0; m < a.num_index; ++m) {
    const int64_t row = load_index(a.index, a.index_dtype, m);
    if (!row_in_range(row, a.num_rows)) continue;  // its gradient goes nowhere
    if (first[row] < 0) {
      first[row] = m;
    } else {
      next[last[row]] = m;
    }
    last[row] = m;
  }
#pragma omp parallel if (a.num_rows * a.width >= (1 << 20))
  {
    std::vector<float> acc(a.width);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.num_rows; ++row) {
      if (first[row] < 0) {
        // All-zero bits are +0.0 in fp32, fp16 and bf16 alike.
        std::memset(static_cast<char*>(a.grad_x) + row * a.width * element, 0, a.width * element);
        continue;
      }
      switch (a.dtype) {
        case kFloat16: sum_row<kFloat16>(a, row, first[row], next, acc); break;
        case kBFloat16: sum_row<kBFloat16>(a, row, first[row], next, acc); break;
        default: sum_row<kFloat32>(a, row, first[row], next, acc); break;
      }
    }
  }
}

}  // namespace fastmlm
