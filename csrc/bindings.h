// Registration functions of the pybind11 module fastmlm._C, one per op family
// (csrc/bind_<family>.cpp). bindings.cpp calls those whose files exist: CMake
// globs csrc/bind_*.cpp and generates the list (see CMakeLists.txt), so a
// family can be added, or be missing while it is written, without editing
// bindings.cpp.
//
// Conventions for every binding: tensors arrive as raw addresses (Python
// ints), sizes and strides in elements, dtypes as the tags of
// common/dtype.h, and `device` (-1: CPU, else the CUDA device index) plus
// `stream` (the raw cudaStream_t of torch's current stream, 0 on the CPU).
// CUDA entry points exist only when FASTMLM_WITH_CUDA is defined; without it,
// a binding called with device >= 0 raises (require_cuda below).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/device.h"

void bind_masking(pybind11::module_& m);
void bind_gather(pybind11::module_& m);
void bind_cross_entropy(pybind11::module_& m);

namespace fastmlm {

#if defined(FASTMLM_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Raised (as RuntimeError) when a CUDA entry point is asked of a build without CUDA.
inline void require_cuda(const char* op) {
  if (!kWithCuda) {
    throw std::runtime_error(std::string("fastmlm._C.") + op +
                             ": this build has no CUDA kernels (nvcc was not found or FASTMLM_CUDA=0 at build time)");
  }
}

template <typename T>
inline T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace fastmlm
