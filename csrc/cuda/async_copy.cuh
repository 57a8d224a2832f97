// Global-to-shared copies that do not pass through registers (cp.async, sm_80+), so that a thread
// can have all of its copies in flight at once: the activation chunk of a step (the state every
// block wrote last step, read from L2) then costs about one L2 round trip instead of one per
// register batch. The emulator keeps the contract below strictly (csrc/emu/emu_async_copy.h): the
// destination is NaN until the wait, and misaligned or misplaced operands fault.
//
// copy_16_async(dst, src): 16 bytes, both addresses 16-byte aligned; dst in shared memory, src in
// global memory. .cg caches in L2 only: the source was written by other SMs.
// wait_async_copies(): this thread's copies have landed; a __syncthreads after it makes every
// thread's copies visible to the block.
#pragma once

#if defined(FUSEDRNN_EMULATED_CUDA)
#include "emu_async_copy.h"
#else

#include <cstdint>

namespace fusedrnn {

__device__ __forceinline__ void copy_16_async(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned shared_dst = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_dst), "l"(src)
               : "memory");
#else
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace fusedrnn

#endif
