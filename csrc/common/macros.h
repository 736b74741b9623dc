// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds of csrc/.
#pragma once

#if defined(__CUDACC__)
#define PYALIGN_HD __host__ __device__ __forceinline__
#else
#define PYALIGN_HD inline
#endif
