// Emulated twins of the tensor-core wrappers in csrc/cuda/mma.cuh (MMA and ldmatrix; same names,
// same signatures), selected when FUSEDRNN_EMULATED_CUDA is defined.
//
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D(16x8) = A(16x16) B(16x8) + C,
// one warp, every lane holding fragments in the PTX ISA layout (groupID = lane >> 2,
// tig = lane % 4; each 32-bit register packs two 16-bit elements, the lower column/row index in
// the low half):
//   A: a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   B: b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C/D: c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// The twin gathers all 32 lanes' fragments through the warp exchange (all 32 lanes must call it,
// as .aligned requires), forms the full matrices and returns this lane's D fragment. Products
// are exact and the sum is accumulated in double and rounded once to float; the tensor core's own
// accumulation order and rounding differ in the last bits (checked only on a GPU).
#pragma once

#include <cstdint>
#include <source_location>

#include "cuda_emu.h"

namespace fusedrnn {
namespace emu_mma_detail {

enum class MmaInput : int { kBf16 = 1, kF16 = 2 };

inline float element_16(uint32_t word, int high, MmaInput type) {
  const uint16_t bits = static_cast<uint16_t>(high ? word >> 16 : word & 0xFFFFu);
  return type == MmaInput::kBf16 ? emu::detail::bf16_bits_to_float(bits)
                                 : emu::detail::half_bits_to_float(bits);
}

inline void mma_m16n8k16(MmaInput type, float (&d)[4], const uint32_t (&a)[4],
                         const uint32_t (&b)[2], const float (&c)[4], const char* what,
                         const std::source_location& loc) {
  uint32_t words[10];
  for (int i = 0; i < 4; ++i) words[i] = a[i];
  words[4] = b[0];
  words[5] = b[1];
  std::memcpy(words + 6, c, sizeof(float) * 4);
  float result[4];
  const int lane = emu::detail::context_or_fault(what).lane;
  emu::detail::warp_exchange(
      emu::detail::WarpOp::kMma, static_cast<int>(type), 0xFFFFFFFFu, words, 10, what, loc,
      [&](const emu::detail::WarpSlot& slot) {
        if (slot.arrived != 0xFFFFFFFFu) {
          emu::detail::fault(emu::detail::describe_site(what, loc.file_name(), loc.line()) +
                             ": mma.sync.aligned needs all 32 lanes of the warp");
        }
        auto a_at = [&](int row, int k) {  // A[row][k]
          const int src = (row % 8) * 4 + (k % 8) / 2;
          const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
          return element_16(slot.words[src][reg], k % 2, type);
        };
        auto b_at = [&](int k, int col) {  // B[k][col]
          const int src = col * 4 + (k % 8) / 2;
          const int reg = k >= 8 ? 1 : 0;
          return element_16(slot.words[src][4 + reg], k % 2, type);
        };
        const int group = lane >> 2, tig = lane & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = group + (i >= 2 ? 8 : 0);
          const int col = tig * 2 + (i & 1);
          double acc = 0.0;
          for (int k = 0; k < 16; ++k) acc += double(a_at(row, k)) * double(b_at(k, col));
          float c_value;
          std::memcpy(&c_value, &slot.words[lane][6 + i], sizeof(float));
          result[i] = static_cast<float>(acc + double(c_value));
        }
      });
  for (int i = 0; i < 4; ++i) d[i] = result[i];
}

// ldmatrix.sync.aligned.m8n8.x{count}{.trans}.shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i (rows of eight 16-bit elements, 16-byte aligned); lane L receives in r[i] the
// elements (L/4, 2(L%4)) and (L/4, 2(L%4)+1) of matrix i, or with .trans of its transpose.
template <int kCount>
inline void ldmatrix(uint32_t (&r)[kCount], const void* row, bool trans, const char* what,
                     const std::source_location& loc) {
  uint32_t words[2];
  const uintptr_t address = reinterpret_cast<uintptr_t>(row);
  std::memcpy(words, &address, sizeof(address));
  const int lane = emu::detail::context_or_fault(what).lane;
  uint32_t result[kCount];
  emu::detail::warp_exchange(
      emu::detail::WarpOp::kLdMatrix, kCount * 2 + (trans ? 1 : 0), 0xFFFFFFFFu, words, 2, what,
      loc, [&](const emu::detail::WarpSlot& slot) {
        if (slot.arrived != 0xFFFFFFFFu) {
          emu::detail::fault(emu::detail::describe_site(what, loc.file_name(), loc.line()) +
                             ": ldmatrix.sync.aligned needs all 32 lanes of the warp");
        }
        auto row_of = [&](int matrix, int row_index) {
          uintptr_t a;
          std::memcpy(&a, slot.words[matrix * 8 + row_index], sizeof(a));
          if (a % 16 != 0) {
            emu::detail::fault(emu::detail::describe_site(what, loc.file_name(), loc.line()) +
                               ": row address of lane " + std::to_string(matrix * 8 + row_index) +
                               " is not 16-byte aligned");
          }
          if (!emu::detail::in_dynamic_smem(*emu::detail::tls_context.block,
                                            reinterpret_cast<const void*>(a), 16)) {
            emu::detail::fault(emu::detail::describe_site(what, loc.file_name(), loc.line()) +
                               ": row address of lane " + std::to_string(matrix * 8 + row_index) +
                               " is not in this block's dynamic shared memory");
          }
          return reinterpret_cast<const uint16_t*>(a);
        };
        for (int i = 0; i < kCount; ++i) {
          uint16_t lo, hi;
          if (!trans) {
            const uint16_t* source = row_of(i, lane / 4);
            lo = source[2 * (lane % 4)];
            hi = source[2 * (lane % 4) + 1];
          } else {
            lo = row_of(i, 2 * (lane % 4))[lane / 4];
            hi = row_of(i, 2 * (lane % 4) + 1)[lane / 4];
          }
          result[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
        }
      });
  for (int i = 0; i < kCount; ++i) r[i] = result[i];
}

}  // namespace emu_mma_detail

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4],
                              const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::mma_m16n8k16(emu_mma_detail::MmaInput::kBf16, d, a, b, c,
                               "mma_m16n8k16_bf16()", loc);
}

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4],
                             const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::mma_m16n8k16(emu_mma_detail::MmaInput::kF16, d, a, b, c, "mma_m16n8k16_f16()",
                               loc);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* row,
                       const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::ldmatrix<1>(r, row, false, "ldmatrix_x1()", loc);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row,
                       const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::ldmatrix<2>(r, row, false, "ldmatrix_x2()", loc);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row,
                       const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::ldmatrix<4>(r, row, false, "ldmatrix_x4()", loc);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row,
                             const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::ldmatrix<1>(r, row, true, "ldmatrix_x1_trans()", loc);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row,
                             const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::ldmatrix<2>(r, row, true, "ldmatrix_x2_trans()", loc);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row,
                             const std::source_location loc = std::source_location::current()) {
  emu_mma_detail::ldmatrix<4>(r, row, true, "ldmatrix_x4_trans()", loc);
}

}  // namespace fusedrnn
