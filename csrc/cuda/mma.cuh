// Tensor-core MMA wrappers: one small device function per instruction shape, so that the
// recurrence's inner product can switch from FMA to tensor cores without restructuring, and so
// that the CPU emulator can substitute a twin that follows the PTX fragment layout exactly
// (csrc/emu/emu_mma.h, same names and signatures, tested against a plain matrix product).
//
// mma_m16n8k16_{bf16,f16}(d, a, b, c): D(16x8, f32) = A(16x16) * B(16x8) + C(16x8, f32) for one
// warp; all 32 lanes call it with their fragments in the PTX layout (groupID g = lane >> 2,
// t = lane % 4; each 32-bit register packs two 16-bit elements, lower index in the low half):
//   a[0] = A[g][2t..2t+1]  a[1] = A[g+8][2t..2t+1]  a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..2t+9][g]
//   c/d[0..1] = C[g][2t..2t+1]  c/d[2..3] = C[g+8][2t..2t+1]
// Requires sm_80 or newer.
#pragma once

#include <cstdint>

#if defined(FUSEDRNN_EMULATED_CUDA)
#include "emu_mma.h"
#else

namespace fusedrnn {

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();  // tensor-core bf16 MMA needs sm_80+
#endif
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace fusedrnn

#endif
