// Module-level CUDA queries (common/device.h).
#include <cuda_runtime.h>

#include "common/device.h"
#include "cuda/cuda_check.cuh"

namespace fastmlm {

namespace {
// Never launched: its attributes are asked for, which makes the runtime load
// this file's code for the device (as the first launch of any kernel would).
__global__ void kernel_image_probe() {}
}  // namespace

int cuda_device_count() {
  int count = 0;
  FASTMLM_CUDA_CHECK(cudaGetDeviceCount(&count));
  return count;
}

KernelImage cuda_kernel_image(int device) {
  DeviceGuard guard(device);
  // Loading picks the build's machine code for this GPU, or JIT-compiles its
  // PTX; either failure (no image for this architecture, a driver too old for
  // the PTX) is the error every kernel launch of the module would report.
  cudaFuncAttributes attributes{};
  FASTMLM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel_image_probe));
  return {attributes.binaryVersion, attributes.ptxVersion};
}

}  // namespace fastmlm
