// Module-level CUDA queries, declared without CUDA headers so the bindings
// (plain C++) can call them.
#pragma once

namespace fastmlm {

// Number of CUDA devices seen by the module's own (static) CUDA runtime;
// throws std::runtime_error with the CUDA error code and string (e.g. 35,
// insufficient driver, on a machine with no driver). Defined in
// csrc/cuda/device.cpp, or in bindings.cpp (always throws) without CUDA.
int cuda_device_count();

}  // namespace fastmlm
