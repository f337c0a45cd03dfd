// Bindings of mask_tokens and masked_positions (adapters:
// fastmlm/kernels/compiled/masking.py). A strided integer matrix arrives as a
// tuple (address, dtype tag, row stride, column stride); address 0 means absent.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>

#include "bindings.h"
#include "common/masking.h"

namespace py = pybind11;

namespace {

using MatrixTuple = std::tuple<uintptr_t, int, int64_t, int64_t>;

fastmlm::IntMatrix to_matrix(const MatrixTuple& t) {
  fastmlm::IntMatrix m;
  m.data = fastmlm::as_ptr<const void>(std::get<0>(t));
  m.dtype = std::get<1>(t);
  m.row_stride = std::get<2>(t);
  m.col_stride = std::get<3>(t);
  return m;
}

void mask_tokens(const MatrixTuple& input_ids, const MatrixTuple& special_tokens_mask,
                 const MatrixTuple& attention_mask, uintptr_t masked_ids, uintptr_t labels, int64_t batch,
                 int64_t length, int64_t mask_token_id, uint32_t vocab_size, uint32_t seed_lo, uint32_t seed_hi,
                 uint32_t select_threshold, uint32_t mask_threshold, uint32_t random_threshold,
                 double mlm_probability, bool exact, int device, uintptr_t stream) {
  fastmlm::MaskTokensArgs a;
  a.input_ids = to_matrix(input_ids);
  a.special_tokens_mask = to_matrix(special_tokens_mask);
  a.attention_mask = to_matrix(attention_mask);
  a.masked_ids = fastmlm::as_ptr<void>(masked_ids);
  a.labels = fastmlm::as_ptr<int64_t>(labels);
  a.batch = batch;
  a.length = length;
  a.mask_token_id = mask_token_id;
  a.vocab_size = vocab_size;
  a.seed_lo = seed_lo;
  a.seed_hi = seed_hi;
  a.select_threshold = select_threshold;
  a.mask_threshold = mask_threshold;
  a.random_threshold = random_threshold;
  a.mlm_probability = mlm_probability;
  a.exact = exact;
  if (device < 0) {
    fastmlm::mask_tokens_cpu(a);
    return;
  }
  fastmlm::require_cuda("mask_tokens");
#if defined(FASTMLM_WITH_CUDA)
  fastmlm::mask_tokens_cuda(a, device, stream);
#endif
}

int64_t masked_positions_workspace_elems(int64_t numel, int device) {
  if (device < 0) return 0;
  fastmlm::require_cuda("masked_positions_workspace_elems");
#if defined(FASTMLM_WITH_CUDA)
  return fastmlm::masked_positions_workspace_elems(numel);
#else
  return 0;
#endif
}

void masked_positions(uintptr_t labels, int labels_dtype, int64_t numel, int64_t ignore_index, uintptr_t index,
                      int64_t capacity, uintptr_t count, uintptr_t workspace, int device, uintptr_t stream) {
  fastmlm::MaskedPositionsArgs a;
  a.labels = fastmlm::as_ptr<const void>(labels);
  a.labels_dtype = labels_dtype;
  a.numel = numel;
  a.ignore_index = ignore_index;
  a.index = fastmlm::as_ptr<int64_t>(index);
  a.capacity = capacity;
  a.count = fastmlm::as_ptr<int64_t>(count);
  if (device < 0) {
    fastmlm::masked_positions_cpu(a);
    return;
  }
  fastmlm::require_cuda("masked_positions");
#if defined(FASTMLM_WITH_CUDA)
  fastmlm::masked_positions_cuda(a, fastmlm::as_ptr<int64_t>(workspace), device, stream);
#endif
}

}  // namespace

void bind_masking(py::module_& m) {
  m.def("mask_tokens", &mask_tokens, py::call_guard<py::gil_scoped_release>(), py::arg("input_ids"),
        py::arg("special_tokens_mask"), py::arg("attention_mask"), py::arg("masked_ids"), py::arg("labels"),
        py::arg("batch"), py::arg("length"), py::arg("mask_token_id"), py::arg("vocab_size"), py::arg("seed_lo"),
        py::arg("seed_hi"), py::arg("select_threshold"), py::arg("mask_threshold"), py::arg("random_threshold"),
        py::arg("mlm_probability"), py::arg("exact"), py::arg("device"), py::arg("stream"),
        "mask_tokens of docs/ops.md; matrices are (address, dtype tag, row stride, column stride), "
        "outputs contiguous [batch, length]; device -1 runs the CPU kernel.");
  m.def("masked_positions_workspace_elems", &masked_positions_workspace_elems, py::arg("numel"), py::arg("device"),
        "int64 entries of device scratch masked_positions needs (0 on the CPU).");
  m.def("masked_positions", &masked_positions, py::call_guard<py::gil_scoped_release>(), py::arg("labels"),
        py::arg("labels_dtype"), py::arg("numel"), py::arg("ignore_index"), py::arg("index"), py::arg("capacity"),
        py::arg("count"), py::arg("workspace"), py::arg("device"), py::arg("stream"),
        "Flat positions of labels != ignore_index into index[:capacity] (then zeros) and the true count.");
}
