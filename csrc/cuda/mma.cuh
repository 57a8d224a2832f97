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
// ldmatrix_x{1,2,4}[_trans](r, row): ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16. Lanes
// 8i..8i+7 pass the shared-memory addresses of rows 0..7 of matrix i (eight 16-bit elements each,
// 16-byte aligned); lane L receives in r[i] elements (L/4, 2(L%4)..2(L%4)+1) of matrix i, or of its
// transpose with _trans. With row = &A[lane % 16][(lane / 16) * 8] of a row-major 16x16 tile,
// ldmatrix_x4 yields exactly the A fragment above; with row = &B[lane % 16][0] of a row-major
// (K x N) 16x8 tile, ldmatrix_x2_trans yields the B fragment.
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

#define FUSEDRNN_LDMATRIX(name, count, qualifiers, ...)                                   \
  __device__ __forceinline__ void name(uint32_t (&r)[count], const void* row) {            \
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));         \
    asm volatile("ldmatrix.sync.aligned.m8n8." qualifiers ".shared.b16 " __VA_ARGS__);      \
  }
FUSEDRNN_LDMATRIX(ldmatrix_x1, 1, "x1", "{%0}, [%1];\n" : "=r"(r[0]) : "r"(address))
FUSEDRNN_LDMATRIX(ldmatrix_x2, 2, "x2", "{%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address))
FUSEDRNN_LDMATRIX(ldmatrix_x4, 4, "x4", "{%0, %1, %2, %3}, [%4];\n"
                  : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address))
FUSEDRNN_LDMATRIX(ldmatrix_x1_trans, 1, "x1.trans", "{%0}, [%1];\n" : "=r"(r[0]) : "r"(address))
FUSEDRNN_LDMATRIX(ldmatrix_x2_trans, 2, "x2.trans", "{%0, %1}, [%2];\n"
                  : "=r"(r[0]), "=r"(r[1]) : "r"(address))
FUSEDRNN_LDMATRIX(ldmatrix_x4_trans, 4, "x4.trans", "{%0, %1, %2, %3}, [%4];\n"
                  : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address))
#undef FUSEDRNN_LDMATRIX

}  // namespace fusedrnn

#endif
