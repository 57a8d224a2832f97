// Portability macros shared by the CPU, CUDA and emulator builds of the core headers.
#pragma once

#if defined(__CUDACC__) || defined(FUSEDRNN_EMULATED_CUDA)
// nvcc, or g++ compiling CUDA sources against csrc/emu/ (which defines __host__/__device__).
#define FUSEDRNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HOST_DEVICE inline
#endif
