// What the recurrence kernels need from CUDA, in one place, so that the same sources compile with
// nvcc (module _cuda) and with g++ against the test-only emulator in csrc/emu (module _emu, built
// with -I csrc/emu -DFUSEDRNN_EMULATED_CUDA: the emulator provides the same header names).
//
// Rules the kernels follow so that both compilers accept them (DESIGN.md, "Testing without a GPU"):
// launches go through cudaLaunchCooperativeKernel (no <<<>>>), each kernel takes one by-value
// params struct, and cooperative kernels use dynamic shared memory only, through
// FUSEDRNN_DYNAMIC_SMEM.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(FUSEDRNN_EMULATED_CUDA)
// The emulator hands every block of a launch its own buffer.
#define FUSEDRNN_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_shared_memory()
#else
#define FUSEDRNN_DYNAMIC_SMEM(name)                                      \
  extern __shared__ __align__(16) unsigned char fusedrnn_dynamic_smem_[]; \
  unsigned char* name = fusedrnn_dynamic_smem_
#endif
