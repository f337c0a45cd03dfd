// mlm_cross_entropy on the CPU: the per-chunk passes over a block of logits
// that the Python adapter (fastmlm/kernels/compiled/cross_entropy.py) has just
// produced with a matmul, and the per-row finalize.
//
// Rows are independent, so OpenMP splits rows across threads and each row's
// pass over the chunk is a pair of tight loops over contiguous floats:
//   forward:  chunk max, then sum of exp(z - max) and sum of z (one exp per
//             logit), folded into the row's running state with `merge`;
//   backward: dz = g (1 + 2 z_loss lse) exp(z - lse) - g ls / V, minus
//             g (1 - ls) at the target, written over the logits.
// The loops carry `#pragma omp simd` and call only branch-free inline math
// (fast_exp in common/cross_entropy.h), so they vectorise. They are compiled
// twice (AVX2+FMA and the baseline ISA) and picked at load time, because the
// module is built for the baseline x86-64 target and this loop is the whole
// cost of a chunk pass beside the matmul.
#if defined(__GNUC__) && !defined(__clang__)
// Under the default -ftrapping-math GCC refuses to if-convert the selects in
// fast_exp (a float compare may raise an FP exception), and the loops stay
// scalar. Nothing here reads FP exception flags, and torch builds the same way.
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/cross_entropy.h"

namespace fastmlm {
namespace cross_entropy {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMLM_CE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTMLM_CE_VECTOR_CLONES
#endif

// Below this many logits in a chunk, waking the thread team costs more than it saves.
constexpr int64_t kParallelMinElements = 1 << 15;

// Threads for a chunk pass: a.num_threads (<= 0: OpenMP's default), at most
// one per row, 1 for small chunks. Rows are split statically, so the result
// does not depend on the thread count.
int pass_threads(const ChunkArgs& a) {
#ifdef _OPENMP
  if (a.rows * a.cols < kParallelMinElements) return 1;
  const int64_t wanted = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, a.rows)));
#else
  return 1;
#endif
}

struct ChunkPartial {
  float max;
  float sum_exp;
  float logit_sum;
};

FASTMLM_CE_VECTOR_CLONES
ChunkPartial reduce_row(const float* z, int64_t n) {
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) max = z[j] > max ? z[j] : max;
  // A NaN logit is skipped by the max but makes the sum NaN, so it reaches lse.
  float sum_exp = 0.0f;
  float logit_sum = 0.0f;
#pragma omp simd reduction(+ : sum_exp, logit_sum)
  for (int64_t j = 0; j < n; ++j) {
    sum_exp += fast_exp(z[j] - max);
    logit_sum += z[j];
  }
  return {max, sum_exp, logit_sum};
}

FASTMLM_CE_VECTOR_CLONES
void grad_row(const float* z, float* dz, int64_t n, RowGradCoeffs c) {
  // z and dz may be the same array (in-place fp32 backward): element j is
  // read before it is written, and no other element is touched.
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dz[j] = logit_grad(z[j], c);
}

inline float load_logit(const void* row, int dtype, int64_t j) {
  switch (dtype) {
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(row)[j]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(row)[j]);
    default: return static_cast<const float*>(row)[j];
  }
}

// The row's logits as contiguous fp32: the row itself for fp32, otherwise
// widened into `scratch`.
const float* row_as_float(const ChunkArgs& a, int64_t row, std::vector<float>& scratch) {
  const char* base = static_cast<const char*>(a.logits) +
                     row * a.logits_row_stride * static_cast<int64_t>(dtype_size(a.logits_dtype));
  if (a.logits_dtype == kFloat32) return reinterpret_cast<const float*>(base);
  for (int64_t j = 0; j < a.cols; ++j) scratch[j] = load_logit(base, a.logits_dtype, j);
  return scratch.data();
}

void* grad_row_ptr(const ChunkArgs& a, int64_t row) {
  return static_cast<char*>(a.grad_logits) +
         row * a.grad_row_stride * static_cast<int64_t>(dtype_size(a.grad_dtype));
}

bool target_in_chunk(const ChunkArgs& a, int64_t target) {
  return target != a.params.ignore_index && target >= a.col_start && target < a.col_start + a.cols;
}

}  // namespace

void cross_entropy_chunk_forward_cpu(const ChunkArgs& a) {
  const int threads = pass_threads(a);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> scratch(a.logits_dtype == kFloat32 ? 0 : a.cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      RowState state = a.first_chunk ? initial_state() : a.state[i];
      const float* z = row_as_float(a, i, scratch);
      if (a.cols > 0) {
        const ChunkPartial part = reduce_row(z, a.cols);
        merge(state, part.max, part.sum_exp, part.logit_sum);
      }
      const int64_t target = a.targets[i];
      if (target_in_chunk(a, target)) state.target_logit = z[target - a.col_start];
      a.state[i] = state;
    }
  }
}

void cross_entropy_finalize_cpu(const FinalizeArgs& a) {
  for (int64_t i = 0; i < a.rows; ++i) {
    finalize_row(a.state[i], a.targets[i], a.params, &a.lse[i], &a.row_loss[i]);
  }
}

void cross_entropy_chunk_backward_cpu(const ChunkArgs& a) {
  const int threads = pass_threads(a);
  // fp32 in, fp32 out: dz goes straight over z. Any other pair stages the row
  // in fp32 scratch first, which also makes an aliasing narrower output safe
  // (the whole row is read before any of it is written).
  const bool direct = a.logits_dtype == kFloat32 && a.grad_dtype == kFloat32;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> in_scratch(a.logits_dtype == kFloat32 ? 0 : a.cols);
    std::vector<float> out_scratch(direct ? 0 : a.cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      const int64_t target = a.targets[i];
      const RowGradCoeffs c = row_grad_coeffs(a.grad_row_loss[i], a.lse[i], target, a.params);
      const float* z = row_as_float(a, i, in_scratch);
      void* out_row = grad_row_ptr(a, i);
      float* dz = direct ? static_cast<float*>(out_row) : out_scratch.data();
      if (target == a.params.ignore_index) {
        // Zeros, not 0 * exp(...): an ignored row must not leak NaN/inf logits.
        std::fill(dz, dz + a.cols, 0.0f);
      } else {
        grad_row(z, dz, a.cols, c);
        if (target_in_chunk(a, target)) dz[target - a.col_start] -= c.target;
      }
      if (direct) continue;
      switch (a.grad_dtype) {
        case kFloat16: {
          uint16_t* out = static_cast<uint16_t*>(out_row);
          for (int64_t j = 0; j < a.cols; ++j) out[j] = float_to_fp16(dz[j]);
          break;
        }
        case kBFloat16: {
          uint16_t* out = static_cast<uint16_t*>(out_row);
          for (int64_t j = 0; j < a.cols; ++j) out[j] = float_to_bf16(dz[j]);
          break;
        }
        default:
          std::copy(dz, dz + a.cols, static_cast<float*>(out_row));
          break;
      }
    }
  }
}

}  // namespace cross_entropy
}  // namespace fastmlm
