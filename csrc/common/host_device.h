// FASTMLM_HD marks inline helpers shared by the C++ (CPU) and CUDA kernels:
// __host__ __device__ under nvcc, nothing under the plain C++ compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTMLM_HD __host__ __device__
#else
#define FASTMLM_HD
#endif
