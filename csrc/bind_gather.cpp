// Bindings of gather_rows and scatter_add_rows (adapters:
// fastmlm/kernels/compiled/gather.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "common/gather.h"

namespace py = pybind11;

namespace {

void gather_rows(uintptr_t x, int64_t x_row_stride, int dtype, uintptr_t index, int index_dtype, uintptr_t out,
                 int64_t num_index, int64_t width, int64_t num_rows, int device, uintptr_t stream) {
  fastmlm::GatherRowsArgs a;
  a.x = fastmlm::as_ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.dtype = dtype;
  a.index = fastmlm::as_ptr<const void>(index);
  a.index_dtype = index_dtype;
  a.out = fastmlm::as_ptr<void>(out);
  a.num_index = num_index;
  a.width = width;
  a.num_rows = num_rows;
  if (device < 0) {
    fastmlm::gather_rows_cpu(a);
    return;
  }
  fastmlm::require_cuda("gather_rows");
#if defined(FASTMLM_WITH_CUDA)
  fastmlm::gather_rows_cuda(a, device, stream);
#endif
}

fastmlm::ScatterAddRowsArgs scatter_args(uintptr_t grad_out, int64_t grad_out_row_stride, int dtype,
                                         uintptr_t index, int index_dtype, uintptr_t grad_x, int64_t num_index,
                                         int64_t num_rows, int64_t width) {
  fastmlm::ScatterAddRowsArgs a;
  a.grad_out = fastmlm::as_ptr<const void>(grad_out);
  a.grad_out_row_stride = grad_out_row_stride;
  a.dtype = dtype;
  a.index = fastmlm::as_ptr<const void>(index);
  a.index_dtype = index_dtype;
  a.grad_x = fastmlm::as_ptr<void>(grad_x);
  a.num_index = num_index;
  a.num_rows = num_rows;
  a.width = width;
  return a;
}

void scatter_add_rows(uintptr_t grad_out, int64_t grad_out_row_stride, int dtype, uintptr_t index, int index_dtype,
                      uintptr_t grad_x, uintptr_t accumulator, int64_t num_index, int64_t num_rows, int64_t width,
                      int device, uintptr_t stream) {
  fastmlm::ScatterAddRowsArgs a =
      scatter_args(grad_out, grad_out_row_stride, dtype, index, index_dtype, grad_x, num_index, num_rows, width);
  a.accumulator = fastmlm::as_ptr<float>(accumulator);
  if (device < 0) {
    fastmlm::scatter_add_rows_cpu(a);
    return;
  }
  fastmlm::require_cuda("scatter_add_rows");
#if defined(FASTMLM_WITH_CUDA)
  fastmlm::scatter_add_rows_atomic_cuda(a, device, stream);
#endif
}

void scatter_add_rows_sorted(uintptr_t grad_out, int64_t grad_out_row_stride, int dtype, uintptr_t sorted_index,
                             int index_dtype, uintptr_t order, uintptr_t grad_x, int64_t num_index, int64_t num_rows,
                             int64_t width, int device, uintptr_t stream) {
  fastmlm::ScatterAddRowsArgs a = scatter_args(grad_out, grad_out_row_stride, dtype, sorted_index, index_dtype,
                                               grad_x, num_index, num_rows, width);
  a.order = fastmlm::as_ptr<const int64_t>(order);
  fastmlm::require_cuda("scatter_add_rows_sorted");
  if (device < 0) throw std::runtime_error("fastmlm._C.scatter_add_rows_sorted: CUDA only (the CPU kernel is already deterministic)");
#if defined(FASTMLM_WITH_CUDA)
  fastmlm::scatter_add_rows_sorted_cuda(a, device, stream);
#endif
}

}  // namespace

void bind_gather(py::module_& m) {
  m.def("gather_rows", &gather_rows, py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("x_row_stride"),
        py::arg("dtype"), py::arg("index"), py::arg("index_dtype"), py::arg("out"), py::arg("num_index"),
        py::arg("width"), py::arg("num_rows"), py::arg("device"), py::arg("stream"),
        "out[m, :] = x[index[m], :]; x has unit column stride, out is contiguous [num_index, width]; "
        "an index outside [0, num_rows) gives a NaN row.");
  m.def("scatter_add_rows", &scatter_add_rows, py::call_guard<py::gil_scoped_release>(), py::arg("grad_out"),
        py::arg("grad_out_row_stride"), py::arg("dtype"), py::arg("index"), py::arg("index_dtype"),
        py::arg("grad_x"), py::arg("accumulator"), py::arg("num_index"), py::arg("num_rows"), py::arg("width"),
        py::arg("device"), py::arg("stream"),
        "grad_x = zeros [num_rows, width], then grad_x[index[m]] += grad_out[m] in fp32. CPU: fixed order; "
        "CUDA: atomics (accumulator: fp32 [num_rows, width] scratch for fp16/bf16, else 0).");
  m.def("scatter_add_rows_sorted", &scatter_add_rows_sorted, py::call_guard<py::gil_scoped_release>(),
        py::arg("grad_out"), py::arg("grad_out_row_stride"), py::arg("dtype"), py::arg("sorted_index"),
        py::arg("index_dtype"), py::arg("order"), py::arg("grad_x"), py::arg("num_index"), py::arg("num_rows"),
        py::arg("width"), py::arg("device"), py::arg("stream"),
        "Deterministic CUDA scatter_add_rows from a stably sorted index and its permutation (no atomics).");
}
