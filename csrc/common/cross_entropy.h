// Math shared by the CPU and CUDA kernels of mlm_cross_entropy (docs/ops.md).
//
// The loss streams over vocabulary chunks. For every row the kernels keep a
// RowState (running max, running sum of exp(z - max), the target logit and
// the running sum of logits for label smoothing); each chunk pass reduces the
// chunk to a partial state and folds it in with `merge`; `finalize_row` turns
// the state into (lse, row_loss); `logit_grad` is the backward per element.
// Everything here is inline and __host__ __device__, so the CPU tests run the
// arithmetic the CUDA kernel runs, including the exponential (nvcc may fuse a
// multiply-add the host build keeps separate: results agree to an ulp).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"  // float_bits, bits_float
#include "common/host_device.h"

#define FASTMLM_CE_HD FASTMLM_HD inline

namespace fastmlm {
namespace cross_entropy {

// Per-row running state, stored as four fp32 values per row ([M, 4] tensor).
struct RowState {
  float max;           // running max of the logits seen so far (-inf: none yet)
  float sum_exp;       // sum of exp(z - max) over the logits seen so far
  float target_logit;  // z[target]; NaN until the chunk holding the target is seen
  float logit_sum;     // sum of z, for the label-smoothing term mean_j z_j
};
static_assert(sizeof(RowState) == 4 * sizeof(float), "RowState is read as fp32 [M, 4]");

FASTMLM_CE_HD RowState initial_state() {
  RowState s;
  s.max = -INFINITY;
  s.sum_exp = 0.0f;
  s.target_logit = NAN;  // a target that never shows up (out of range) yields a NaN loss
  s.logit_sum = 0.0f;
  return s;
}

// exp(x) for x <= ~88, relative error ~2 ulp; 0 below -87.3; NaN stays NaN.
// Why not expf: libm's expf is a call the compiler cannot vectorise unless
// built with -ffast-math, and this loop is the whole cost of a chunk pass
// on CPU. Branch-free arithmetic vectorises under `#pragma omp simd` and
// costs a handful of FMAs on the GPU as well.
FASTMLM_CE_HD float fast_exp(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;        // 10 significant bits: n * ln2_hi is exact
  const float ln2_lo = -2.12194440e-4f;
  const float round_magic = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer
  // Selects, not fminf/fmaxf: a NaN input must stay NaN (fmaxf would drop it
  // and hide a diverged model behind a finite loss).
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.3f ? 88.3f : xc;
  // Plain multiply-adds, not fmaf: without FMA in the host target, fmaf is a
  // libm call that blocks vectorisation. Contracted or not, the result is
  // within an ulp: n * ln2_hi is exact, and an n off by one only moves r
  // slightly outside [-ln2/2, ln2/2], where the polynomial is still accurate.
  const float shifted = xc * log2e + round_magic;
  const float n = shifted - round_magic;  // round(x / ln 2)
  const int32_t n_int = static_cast<int32_t>(float_bits(shifted) - float_bits(round_magic));
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  // Minimax polynomial of exp on [-ln2/2, ln2/2] (Cephes expf coefficients).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + (r + 1.0f);
  const float scale = bits_float(static_cast<uint32_t>(n_int + 127) << 23);  // 2^n, n in [-126, 127]
  // A select of constants, not `x < lo ? 0 : p * scale`: under the default
  // -ftrapping-math GCC will not speculate the multiply, and the branch left
  // behind stops vectorisation.
  const float underflow_mask = x < -87.3f ? 0.0f : 1.0f;
  return p * scale * underflow_mask;
}

// Combines two partial (max, sum of exp(z - max)) pairs into the first. An
// empty partial (max = -inf) changes nothing, which also keeps its
// exp(-inf - -inf) = NaN sum out. Used by the GPU's lane/warp tree and by `merge`.
FASTMLM_CE_HD void merge_partial(float& max_a, float& sum_a, float max_b, float sum_b) {
  if (!(max_b > -INFINITY)) return;  // b empty
  if (!(max_a > -INFINITY)) {        // a empty
    max_a = max_b;
    sum_a = sum_b;
    return;
  }
  if (max_b > max_a) {
    sum_a = sum_a * fast_exp(max_a - max_b) + sum_b;
    max_a = max_b;
  } else {
    sum_a += sum_b * fast_exp(max_b - max_a);
  }
}

// Folds a chunk's partial (max, sum of exp(z - max), sum of z) into the
// row's running state.
FASTMLM_CE_HD void merge(RowState& state, float chunk_max, float chunk_sum_exp, float chunk_logit_sum) {
  state.logit_sum += chunk_logit_sum;
  if (chunk_max != chunk_max || state.max != state.max) {  // NaN logits poison the row for good
    state.max = NAN;
    return;
  }
  merge_partial(state.max, state.sum_exp, chunk_max, chunk_sum_exp);
}

// Defaults so that a pass setting only some fields (the forward chunk pass needs
// ignore_index alone) never carries indeterminate values.
struct LossParams {
  int64_t vocab_size = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  float z_loss = 0.0f;
};

// lse and the row loss of docs/ops.md:
//   (1 - ls) (lse - z_t) + ls (lse - mean_j z_j) + z_loss lse^2, ignored rows 0.
// lse is reported for ignored rows too (it is defined for every row).
FASTMLM_CE_HD void finalize_row(const RowState& state, int64_t target, const LossParams& p,
                                float* lse_out, float* loss_out) {
  float lse = state.max + logf(state.sum_exp);
  // A NaN logit always reaches logit_sum, but can slip past the max/sum_exp
  // reductions (a chunk row or a GPU thread holding only NaNs has max -inf
  // and is skipped by merge); a diverged model must not get a finite loss.
  if (state.logit_sum != state.logit_sum) lse = state.logit_sum;
  *lse_out = lse;
  if (target == p.ignore_index) {
    *loss_out = 0.0f;
    return;
  }
  const float mean_logit = state.logit_sum / static_cast<float>(p.vocab_size);
  float loss = (1.0f - p.label_smoothing) * (lse - state.target_logit);
  if (p.label_smoothing != 0.0f) loss += p.label_smoothing * (lse - mean_logit);
  if (p.z_loss != 0.0f) loss += p.z_loss * lse * lse;
  *loss_out = loss;
}

// Row constants of the backward, so the per-element work is one exp and two FMAs:
//   dz_j = g (1 + 2 z_loss lse) exp(z_j - lse) - g ls / V - g (1 - ls) [j = t].
struct RowGradCoeffs {
  float softmax_scale;  // g (1 + 2 z_loss lse); 0 for ignored rows
  float uniform;        // g ls / V
  float target;         // g (1 - ls)
  float lse;
};

FASTMLM_CE_HD RowGradCoeffs row_grad_coeffs(float grad_row_loss, float lse, int64_t target,
                                            const LossParams& p) {
  RowGradCoeffs c;
  c.lse = lse;
  if (target == p.ignore_index) {
    c.softmax_scale = 0.0f;
    c.uniform = 0.0f;
    c.target = 0.0f;
    c.lse = 0.0f;  // keeps exp(z - lse) finite whatever lse holds for an ignored row
    return c;
  }
  c.softmax_scale = grad_row_loss * (1.0f + 2.0f * p.z_loss * lse);
  c.uniform = grad_row_loss * p.label_smoothing / static_cast<float>(p.vocab_size);
  c.target = grad_row_loss * (1.0f - p.label_smoothing);
  return c;
}

// dz for one logit that is not the target column (the target subtracts c.target).
FASTMLM_CE_HD float logit_grad(float z, const RowGradCoeffs& c) {
  return c.softmax_scale * fast_exp(z - c.lse) - c.uniform;
}


// One vocabulary chunk of logits, [rows, cols], the columns
// [col_start, col_start + cols) of the full [M, V] logit matrix. Strides in
// elements; columns are contiguous.
struct ChunkArgs {
  const void* logits = nullptr;
  int logits_dtype = kFloat32;     // kFloat32, kFloat16 or kBFloat16
  int64_t logits_row_stride = 0;
  // Backward output dz, [rows, cols], contiguous columns. It may alias
  // `logits` even with a narrower dtype (fp32 logits, bf16 dz in the same
  // bytes, row stride in bf16 elements twice the fp32 one): every row's output
  // bytes lie inside that row's input bytes, and the kernels read a whole row
  // before writing it.
  void* grad_logits = nullptr;
  int grad_dtype = kFloat32;
  int64_t grad_row_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t col_start = 0;
  const int64_t* targets = nullptr;     // [rows], contiguous
  RowState* state = nullptr;            // forward: [rows], updated in place
  bool first_chunk = false;             // forward: start from initial_state()
  const float* lse = nullptr;           // backward: [rows]
  const float* grad_row_loss = nullptr; // backward: [rows], contiguous
  LossParams params;
  int num_threads = 0;                  // CPU: OpenMP threads for the pass, <= 0: OpenMP's default
};

struct FinalizeArgs {
  const RowState* state = nullptr;  // [rows]
  const int64_t* targets = nullptr; // [rows]
  float* row_loss = nullptr;        // [rows] out
  float* lse = nullptr;             // [rows] out
  int64_t rows = 0;
  LossParams params;
};

// csrc/cpu/cross_entropy.cpp
void cross_entropy_chunk_forward_cpu(const ChunkArgs& args);
void cross_entropy_finalize_cpu(const FinalizeArgs& args);
void cross_entropy_chunk_backward_cpu(const ChunkArgs& args);

// csrc/cuda/cross_entropy.cu: asynchronous on `stream` (a cudaStream_t) of
// `device`; CUDA errors are thrown as std::runtime_error (csrc/cuda/cuda_check.cuh).
void cross_entropy_chunk_forward_cuda(const ChunkArgs& args, int device, uintptr_t stream);
void cross_entropy_finalize_cuda(const FinalizeArgs& args, int device, uintptr_t stream);
void cross_entropy_chunk_backward_cuda(const ChunkArgs& args, int device, uintptr_t stream);

}  // namespace cross_entropy
}  // namespace fastmlm
