// Module-level CUDA queries (common/device.h).
#include <cuda_runtime.h>

#include "common/device.h"
#include "cuda/cuda_check.cuh"

namespace fastmlm {

int cuda_device_count() {
  int count = 0;
  FASTMLM_CUDA_CHECK(cudaGetDeviceCount(&count));
  return count;
}

}  // namespace fastmlm
