// Error handling and device selection for every CUDA launcher.
//
// The module links the CUDA runtime statically, so it has its own runtime
// state beside PyTorch's: the current device is NOT shared with torch. Each
// launcher therefore selects the tensor's device with DeviceGuard (restoring
// the previous one, which the driver-level current context shares with
// torch), and turns every CUDA error into std::runtime_error, which pybind11
// raises in Python as RuntimeError carrying the CUDA error name and string.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastmlm {

inline std::string cuda_error_message(cudaError_t err, const char* what, const char* file, int line) {
  return std::string("fastmlm._C: CUDA error ") + std::to_string(static_cast<int>(err)) + " (" +
         cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ") in " + what + " at " + file + ":" +
         std::to_string(line);
}

#define FASTMLM_CUDA_CHECK(expr)                                                                 \
  do {                                                                                           \
    cudaError_t fastmlm_err_ = (expr);                                                           \
    if (fastmlm_err_ != cudaSuccess) {                                                           \
      cudaGetLastError(); /* clear it, or the next launch check would report it again */         \
      throw std::runtime_error(::fastmlm::cuda_error_message(fastmlm_err_, #expr, __FILE__, __LINE__)); \
    }                                                                                            \
  } while (0)

// After a <<<...>>> launch: configuration errors surface here, not at the launch.
#define FASTMLM_CUDA_CHECK_LAUNCH() FASTMLM_CUDA_CHECK(cudaGetLastError())

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FASTMLM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) FASTMLM_CUDA_CHECK(cudaSetDevice(device));
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Grid sizes: at most this many blocks; kernels stride over the rest.
constexpr int64_t kMaxGridBlocks = 65535LL * 8;

inline unsigned grid_blocks(int64_t work_items, int64_t per_block) {
  int64_t blocks = (work_items + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxGridBlocks) blocks = kMaxGridBlocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace fastmlm
