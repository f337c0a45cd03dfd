// Bindings of the mlm_cross_entropy chunk kernels (adapter:
// fastmlm/kernels/compiled/cross_entropy.py). Conventions: csrc/bindings.h.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "common/cross_entropy.h"

namespace py = pybind11;
namespace ce = fastmlm::cross_entropy;

namespace {

ce::LossParams loss_params(int64_t vocab_size, int64_t ignore_index, double label_smoothing, double z_loss) {
  ce::LossParams p;
  p.vocab_size = vocab_size;
  p.ignore_index = ignore_index;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  return p;
}

ce::ChunkArgs chunk_args(uintptr_t logits, int logits_dtype, int64_t logits_row_stride, int64_t rows, int64_t cols,
                         int64_t col_start, uintptr_t targets) {
  ce::ChunkArgs a;
  a.logits = fastmlm::as_ptr<const void>(logits);
  a.logits_dtype = logits_dtype;
  a.logits_row_stride = logits_row_stride;
  a.rows = rows;
  a.cols = cols;
  a.col_start = col_start;
  a.targets = fastmlm::as_ptr<const int64_t>(targets);
  return a;
}

void chunk_forward(uintptr_t logits, int logits_dtype, int64_t logits_row_stride, int64_t rows, int64_t cols,
                   int64_t col_start, uintptr_t targets, uintptr_t state, bool first_chunk, int64_t ignore_index,
                   int num_threads, int device, [[maybe_unused]] uintptr_t stream) {
  ce::ChunkArgs a = chunk_args(logits, logits_dtype, logits_row_stride, rows, cols, col_start, targets);
  a.state = fastmlm::as_ptr<ce::RowState>(state);
  a.first_chunk = first_chunk;
  a.params.ignore_index = ignore_index;
  a.num_threads = num_threads;
  if (device < 0) {
    ce::cross_entropy_chunk_forward_cpu(a);
    return;
  }
  fastmlm::require_cuda("cross_entropy_chunk_forward");
#if defined(FASTMLM_WITH_CUDA)
  ce::cross_entropy_chunk_forward_cuda(a, device, stream);
#endif
}

void finalize(uintptr_t state, uintptr_t targets, uintptr_t row_loss, uintptr_t lse, int64_t rows, int64_t vocab_size,
              int64_t ignore_index, double label_smoothing, double z_loss, int device,
              [[maybe_unused]] uintptr_t stream) {
  ce::FinalizeArgs a;
  a.state = fastmlm::as_ptr<const ce::RowState>(state);
  a.targets = fastmlm::as_ptr<const int64_t>(targets);
  a.row_loss = fastmlm::as_ptr<float>(row_loss);
  a.lse = fastmlm::as_ptr<float>(lse);
  a.rows = rows;
  a.params = loss_params(vocab_size, ignore_index, label_smoothing, z_loss);
  if (device < 0) {
    ce::cross_entropy_finalize_cpu(a);
    return;
  }
  fastmlm::require_cuda("cross_entropy_finalize");
#if defined(FASTMLM_WITH_CUDA)
  ce::cross_entropy_finalize_cuda(a, device, stream);
#endif
}

void chunk_backward(uintptr_t logits, int logits_dtype, int64_t logits_row_stride, uintptr_t grad_logits,
                    int grad_dtype, int64_t grad_row_stride, int64_t rows, int64_t cols, int64_t col_start,
                    uintptr_t targets, uintptr_t lse, uintptr_t grad_row_loss, int64_t vocab_size,
                    int64_t ignore_index, double label_smoothing, double z_loss, int num_threads, int device,
                    [[maybe_unused]] uintptr_t stream) {
  ce::ChunkArgs a = chunk_args(logits, logits_dtype, logits_row_stride, rows, cols, col_start, targets);
  a.grad_logits = fastmlm::as_ptr<void>(grad_logits);
  a.grad_dtype = grad_dtype;
  a.grad_row_stride = grad_row_stride;
  a.lse = fastmlm::as_ptr<const float>(lse);
  a.grad_row_loss = fastmlm::as_ptr<const float>(grad_row_loss);
  a.params = loss_params(vocab_size, ignore_index, label_smoothing, z_loss);
  a.num_threads = num_threads;
  if (device < 0) {
    ce::cross_entropy_chunk_backward_cpu(a);
    return;
  }
  fastmlm::require_cuda("cross_entropy_chunk_backward");
#if defined(FASTMLM_WITH_CUDA)
  ce::cross_entropy_chunk_backward_cuda(a, device, stream);
#endif
}

}  // namespace

void bind_cross_entropy(py::module_& m) {
  m.def("cross_entropy_chunk_forward", &chunk_forward, py::call_guard<py::gil_scoped_release>(), py::arg("logits"),
        py::arg("logits_dtype"), py::arg("logits_row_stride"), py::arg("rows"), py::arg("cols"),
        py::arg("col_start"), py::arg("targets"), py::arg("state"), py::arg("first_chunk"),
        py::arg("ignore_index"), py::arg("num_threads"), py::arg("device"), py::arg("stream"),
        "Folds logits [rows, cols] (vocabulary columns col_start..col_start+cols) into the fp32 [rows, 4] "
        "running state (max, sum_exp, target_logit, logit_sum); first_chunk starts from the empty state. "
        "num_threads: CPU OpenMP threads (<= 0: OpenMP's default; ignored on CUDA).");
  m.def("cross_entropy_finalize", &finalize, py::call_guard<py::gil_scoped_release>(), py::arg("state"),
        py::arg("targets"), py::arg("row_loss"), py::arg("lse"), py::arg("rows"), py::arg("vocab_size"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("device"),
        py::arg("stream"), "row_loss and lse (fp32 [rows]) from the running state after the last chunk.");
  m.def("cross_entropy_chunk_backward", &chunk_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("logits"), py::arg("logits_dtype"), py::arg("logits_row_stride"), py::arg("grad_logits"),
        py::arg("grad_dtype"), py::arg("grad_row_stride"), py::arg("rows"), py::arg("cols"), py::arg("col_start"),
        py::arg("targets"), py::arg("lse"), py::arg("grad_row_loss"), py::arg("vocab_size"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("num_threads"),
        py::arg("device"), py::arg("stream"),
        "dz of the chunk (may be written over the logits, also narrowed fp32 -> fp16/bf16 in the same bytes).");
}
