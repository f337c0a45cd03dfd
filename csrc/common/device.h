// Module-level CUDA queries, declared without CUDA headers so the bindings
// (plain C++) can call them.
#pragma once

namespace fastmlm {

// Number of CUDA devices seen by the module's own (static) CUDA runtime;
// throws std::runtime_error with the CUDA error code and string (e.g. 35,
// insufficient driver, on a machine with no driver). Defined in
// csrc/cuda/device.cu, or in bindings.cpp (always throws) without CUDA.
int cuda_device_count();

// The module's code as loaded for one GPU (cudaFuncAttributes): the
// architecture of the machine code that runs and of the virtual architecture
// (PTX) it was compiled from, both as major * 10 + minor.
struct KernelImage {
  int binary_version;
  int ptx_version;
};

// Loads the module's kernels for `device` without launching anything; throws
// std::runtime_error with the CUDA error when they cannot load there (no
// machine code or PTX for its architecture, or a driver too old to JIT the PTX).
KernelImage cuda_kernel_image(int device);

}  // namespace fastmlm
