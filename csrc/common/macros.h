// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds of csrc/.
#pragma once

#if defined(__CUDACC__)
#define PYALIGN_HD __host__ __device__ __forceinline__
#else
// always_inline: the softmax loops vectorize only when the math is inlined into them.
#define PYALIGN_HD inline __attribute__((always_inline))
#endif
