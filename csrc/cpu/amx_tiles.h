// Intel AMX (Advanced Matrix Extensions) for the bfloat16 recurrence's per-step product, in the
// `amx` build of the kernel (recurrence_isa_amx.cpp, compiled with -mamx-tile -mamx-bf16).
//
// Why: one TDPBF16PS multiplies a 16x32 bfloat16 tile by a 32x16 one into 16x16 float sums,
// 8192 multiply-adds. Measured on the 2-core SPR VM: ~1.4-1.7 T multiply-adds/s per core with
// the operand loads, against ~50 G for AVX-512 FMAs (and ~57 G for AVX512-BF16's VDPBF16PS,
// which issues every other cycle here, so it was no way out). That is the gap between torch.nn's
// bfloat16 LSTM (oneDNN runs its GEMMs on AMX) and the AVX-512 kernel at large batches.
//
// Like every bfloat16 GEMM (torch.nn's included), the product takes both operands in bfloat16:
// h_{t-1} (or d_pre going backward) is rounded to bfloat16 for it, where the AVX-512 kernel
// multiplies the float values. The sums, the cell state and everything pointwise stay float.
// TDPBF16PS treats denormal inputs as zero and flushes denormal sums, as oneDNN's AMX does.
//
// Float32 layers stay on AVX-512 FMAs. Tried: split each float operand into three bfloat16 parts
// (exact) and sum the six part products float32 does not round away. The accuracy held (errors
// against float64 as the FMA kernel's), but on the 2-core SPR VM the LSTM B=64 H=512 forward
// gained ~10% and the backward nothing: six tile products bound by their loads from L2 cost
// about what the FMAs do.
//
// Operand layouts (AMX's own):
//   A: rows of the left operand in bfloat16, any row stride; a tile is 16 rows x 32 k.
//   B: the right operand "VNNI-packed": a tile is 16 rows, row kk holding, for 16 columns, the
//      pair (k = 2kk, 2kk + 1) in one 32-bit word. A packed panel (pack_amx_panel) stores, per
//      chunk of 32 k, NV such tiles (NV column vectors of 16), chunk after chunk.
//   C: 16 rows x 16 float sums per tile; a panel's NV tiles go to NV adjacent vectors of a row.
//
// The avx512bf16 build (FUSEDRNN_CPU_BF16DOT, recurrence_isa_avx512bf16.cpp) runs the same
// products, on the same packed panels and bfloat16 A rows, with AVX512-BF16's VDPBF16PS instead
// of tiles: one tile row of a packed B panel (16 columns x one pair of k) is exactly the operand
// VDPBF16PS multiplies with a broadcast pair of A. That is for CPUs with AVX512-BF16 and no AMX,
// where VDPBF16PS does twice the multiply-adds of an FMA: AMD Zen 4 (measured on a 2-core EPYC
// VM: 7.1 G VDPBF16PS/s, 228 G multiply-adds/s per core, against ~50 G for the FMA kernel).
// Its numerics are the tiles': bfloat16 products summed in float, denormals flushed.
//
// Every build includes this header (recurrence_layouts.h names the layout helpers everywhere); only
// the AMX and avx512bf16 builds have the product code, and only they ever set FwdLayout::amx
// (which names the layout, "the bfloat16 VNNI product", after the build that came first).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "amx_tiles.h is included by the per-ISA translation units only"
#endif

#if defined(FUSEDRNN_CPU_AMX) || defined(FUSEDRNN_CPU_BF16DOT)
#define FUSEDRNN_CPU_VNNI_BF16 1
#include <immintrin.h>
#endif
#if defined(FUSEDRNN_CPU_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>
#include <cstring>

#include "simd_vec.h"
#include "storage.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

constexpr int kAmxRows = 16;         // rows of every tile
constexpr int kAmxDepth = 32;        // k per A/B tile (bfloat16: 64 bytes a row)
constexpr int kAmxCols = 16;         // float columns of a C tile
constexpr int kAmxTileElems = 512;   // bfloat16 elements of a packed B tile
constexpr int kAmxMaxVecs = 4;       // C tiles a panel may use (tiles 0..3; A is 4, B 5 and 6)

// Whether this build has the bfloat16 VNNI product (tiles or VDPBF16PS).
#if defined(FUSEDRNN_CPU_VNNI_BF16)
constexpr bool kVnniBf16Build = true;
#else
constexpr bool kVnniBf16Build = false;
#endif

// Rows of a row buffer that AMX reads or writes: whole tiles.
constexpr int64_t amx_rows(int64_t rows) { return (rows + kAmxRows - 1) / kAmxRows * kAmxRows; }
// Depth of a packed operand: whole chunks of 32 k.
constexpr int64_t amx_chunks(int64_t depth) { return (depth + kAmxDepth - 1) / kAmxDepth; }
// Row stride (elements) of a bfloat16 A buffer of `depth` columns: whole chunks, plus one cache
// line so that the 16 rows of a tile do not share L1 sets at power-of-two depths.
constexpr int64_t amx_lda(int64_t depth) { return amx_chunks(depth) * kAmxDepth + 32; }
// bfloat16 elements of one packed panel: NV B tiles per chunk of 32 k of `depth`.
constexpr int64_t amx_panel_elems(int nv, int64_t depth) {
  return amx_chunks(depth) * nv * kAmxTileElems;
}

#if defined(FUSEDRNN_CPU_VNNI_BF16)
// One packed panel: NV column vectors of 16 columns over depth K, from a bfloat16 source where
// column c, depth k is at src[c * ld + k] (contiguous along k) and col_of(v, w) gives the column
// of lane w of vector v, or -1 for padding. Padding columns and k >= K are zeros (A's padding
// columns are zeros too, so no padding product can make a NaN).
template <int NV, typename ColOf>
void pack_amx_panel(BFloat16* dest, const BFloat16* src, int64_t ld, int64_t K, ColOf col_of) {
  using V = Vec<float, 16>;
  const int64_t chunks = amx_chunks(K);
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const int64_t k0 = kc * kAmxDepth;
    for (int v = 0; v < NV; ++v) {
      BFloat16* tile = dest + (kc * NV + v) * kAmxTileElems;
      if (k0 + kAmxDepth <= K) {
        // A full chunk: 16 columns x 16 pairs of k, transposed as 32-bit words (the float
        // shuffles move bits, no arithmetic touches them).
        V words[16];
        for (int w = 0; w < 16; ++w) {
          const int64_t col = col_of(v, w);
          words[w] = col < 0 ? V::zero() : V::load(reinterpret_cast<const float*>(src + col * ld + k0));
        }
        transpose<float, 16>(words);
        for (int kk = 0; kk < 16; ++kk) words[kk].store(reinterpret_cast<float*>(tile) + kk * 16);
      } else {
        for (int kk = 0; kk < 16; ++kk) {
          for (int w = 0; w < 16; ++w) {
            const int64_t col = col_of(v, w);
            for (int e = 0; e < 2; ++e) {
              const int64_t k = k0 + 2 * kk + e;
              tile[(kk * 16 + w) * 2 + e] = col >= 0 && k < K ? src[col * ld + k] : BFloat16{0};
            }
          }
        }
      }
    }
  }
}

// The same panel from a source contiguous along the columns: column c, depth k at
// src[k * ld + c] (W_hh as the backward reads it, its columns being W_hh's). Columns
// [first, first + cols) fill the panel's NV * 16 lanes in order, the rest is padding.
template <int NV>
void pack_amx_panel_by_rows(BFloat16* dest, const BFloat16* src, int64_t ld, int64_t K,
                            int64_t first, int64_t cols) {
  const int64_t chunks = amx_chunks(K);
  for (int64_t kc = 0; kc < chunks; ++kc) {
    for (int v = 0; v < NV; ++v) {
      BFloat16* tile = dest + (kc * NV + v) * kAmxTileElems;
      const int64_t c0 = first + v * 16;
      const int64_t left = cols - v * 16;
      const int n = left <= 0 ? 0 : (left < 16 ? static_cast<int>(left) : 16);
      for (int kk = 0; kk < 16; ++kk) {
        // Tile row kk interleaves the 16 columns of k = 2kk and of k = 2kk + 1.
        const int64_t k = kc * kAmxDepth + 2 * kk;
        const BFloat16* even = k < K ? src + k * ld + c0 : nullptr;
        const BFloat16* odd = k + 1 < K ? src + (k + 1) * ld + c0 : nullptr;
        BFloat16* out = tile + kk * 32;
        for (int w = 0; w < 16; ++w) {
          out[2 * w] = even != nullptr && w < n ? even[w] : BFloat16{0};
          out[2 * w + 1] = odd != nullptr && w < n ? odd[w] : BFloat16{0};
        }
      }
    }
  }
}

#endif

#if defined(FUSEDRNN_CPU_AMX)
// Whether Linux (5.16+) grants this process the tile data state: asked once, the first time a
// layer would use the tiles (arch_prctl ARCH_REQ_XCOMP_PERM, as oneDNN does before its AMX
// kernels; per process, idempotent). A tile instruction without the grant is a SIGILL. Refused,
// the layers keep the AVX-512 path.
inline bool amx_tiles_granted() {
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// The tile configuration, as LDTILECFG reads it (64 bytes).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

// Configures this thread's tiles for the kernel and, when it ends, gives the thread back the
// configuration it had. The thread may be one of torch's (OpenMP) threads, on which oneDNN may
// have left its own configuration and may expect to find it again.
class AmxTileScope {
 public:
  explicit AmxTileScope(bool active) : active_(active) {
    if (!active_) return;
    _tile_storeconfig(&saved_);
    AmxTileConfig config;
    config.palette = 1;
    for (int t = 0; t < 7; ++t) {
      config.rows[t] = kAmxRows;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
  }
  ~AmxTileScope() {
    if (!active_) return;
    if (saved_.palette != 0) {
      _tile_loadconfig(&saved_);
    } else {
      _tile_release();
    }
  }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;

 private:
  bool active_;
  AmxTileConfig saved_;
};


// C[rows, NV * 16] = A[rows, K] x panel, K in `chunks` chunks of 32: a row's NV vectors of sums
// at c + row * ldc + v * 16 (ldc in floats). A and the panel as described above; the tiles
// configured by an AmxTileScope. The tiles compute (and store) whole tiles of 16 rows: A and C
// have amx_rows(rows) rows, the padding rows of A zeros.
// On the 2-core SPR VM this runs at ~10 ns per TDPBF16PS (~5 when every operand is in L1): the
// tile loads from L2 bound it. Passes over k short enough to keep the B tiles in L1 across the
// row tiles measured no faster (the C tiles then make round trips).
template <int NV>
inline void amx_panel_product(const BFloat16* a, int64_t lda, int64_t rows,
                              const BFloat16* panel, int64_t chunks, float* c, int64_t ldc) {
  static_assert(NV >= 1 && NV <= kAmxMaxVecs, "a panel uses at most 4 C tiles");
  const int64_t row_tiles = amx_rows(rows) / kAmxRows;
  const int64_t a_stride = lda * static_cast<int64_t>(sizeof(BFloat16));
  const int64_t c_stride = ldc * static_cast<int64_t>(sizeof(float));
  // GCC's tile intrinsics do not tell the compiler which memory they read or write: compiler
  // barriers order the stores of A and of the packed panel before the loads here, and the tile
  // stores before the reads of C after (with one thread there is no team barrier in between).
  __asm__ volatile("" ::: "memory");
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    _tile_zero(0);
    if constexpr (NV > 1) _tile_zero(1);
    if constexpr (NV > 2) _tile_zero(2);
    if constexpr (NV > 3) _tile_zero(3);
    const BFloat16* a_rows = a + rt * kAmxRows * lda;
    for (int64_t kc = 0; kc < chunks; ++kc) {
      const BFloat16* b = panel + kc * NV * kAmxTileElems;
      _tile_loadd(4, a_rows + kc * kAmxDepth, a_stride);
      // Two B tiles in turn, so that a load need not wait for the product reading the other.
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (NV > 1) {
        _tile_loadd(6, b + kAmxTileElems, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if constexpr (NV > 2) {
        _tile_loadd(5, b + 2 * kAmxTileElems, 64);
        _tile_dpbf16ps(2, 4, 5);
      }
      if constexpr (NV > 3) {
        _tile_loadd(6, b + 3 * kAmxTileElems, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    float* c_rows = c + rt * kAmxRows * ldc;
    _tile_stored(0, c_rows, c_stride);
    if constexpr (NV > 1) _tile_stored(1, c_rows + kAmxCols, c_stride);
    if constexpr (NV > 2) _tile_stored(2, c_rows + 2 * kAmxCols, c_stride);
    if constexpr (NV > 3) _tile_stored(3, c_rows + 3 * kAmxCols, c_stride);
  }
  __asm__ volatile("" ::: "memory");
}
#else
// No tile state to ask for or to configure: the avx512bf16 build needs none, and the other builds
// never run a bfloat16 VNNI product (FwdLayout::amx is false there).
constexpr bool amx_tiles_granted() { return kVnniBf16Build; }
struct AmxTileScope {
  explicit AmxTileScope(bool) {}
};
#endif

#if defined(FUSEDRNN_CPU_BF16DOT)
// amx_panel_product's contract, on VDPBF16PS: blocks of MR rows x NV vectors of float sums stay
// in registers for the whole depth; per pair of k, each B vector (a tile row of the panel) is
// loaded once for the block and each row's pair of A is broadcast once for the NV vectors.
template <int NV, int M>
FUSEDRNN_VEC_INLINE void vnni_rows(const BFloat16* a, int64_t lda, const BFloat16* panel,
                                   int64_t chunks, float* c, int64_t ldc) {
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const BFloat16* b = panel + kc * NV * kAmxTileElems;
    const BFloat16* a_chunk = a + kc * kAmxDepth;
#pragma GCC unroll 2
    for (int kk = 0; kk < kAmxDepth / 2; ++kk) {
      __m512bh bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        bv[v] = (__m512bh)_mm512_loadu_si512(b + v * kAmxTileElems + kk * 2 * kAmxCols);
      }
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i) {
        int32_t pair;
        std::memcpy(&pair, a_chunk + i * lda + 2 * kk, sizeof(pair));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * kAmxCols, acc[i][v]);
  }
}

// Rows [0, m) with blocks of at most M rows (m < M: the last, shorter block).
template <int NV, int M>
FUSEDRNN_VEC_INLINE void vnni_block(int m, const BFloat16* a, int64_t lda, const BFloat16* panel,
                                    int64_t chunks, float* c, int64_t ldc) {
  if constexpr (M > 1) {
    if (m < M) {
      vnni_block<NV, M - 1>(m, a, lda, panel, chunks, c, ldc);
      return;
    }
  }
  vnni_rows<NV, M>(a, lda, panel, chunks, c, ldc);
}

template <int NV>
inline void amx_panel_product(const BFloat16* a, int64_t lda, int64_t rows,
                              const BFloat16* panel, int64_t chunks, float* c, int64_t ldc) {
  static_assert(NV >= 1 && NV <= kAmxMaxVecs, "a panel has at most 4 vectors");
  // FUSEDRNN_CPU_ACC_REGS of the 32 vector registers hold sums, the rest the B vectors and the
  // broadcast; at most 16 rows, a tile's. Only the `rows` rows are computed (the tiles compute
  // whole tiles: at batch 4 the backward took 30 instead of 23 ms on FMAs before this).
  constexpr int kSums = FUSEDRNN_CPU_ACC_REGS / NV;
  constexpr int MR = kSums < kAmxRows ? kSums : kAmxRows;
  for (int64_t r0 = 0; r0 < rows; r0 += MR) {
    const int m = static_cast<int>(rows - r0 < MR ? rows - r0 : MR);
    vnni_block<NV, MR>(m, a + r0 * lda, lda, panel, chunks, c + r0 * ldc, ldc);
  }
}
#elif !defined(FUSEDRNN_CPU_VNNI_BF16)
// The other builds never run a bfloat16 VNNI product: FwdLayout::amx is false there.
template <int NV, typename ColOf>
void pack_amx_panel(BFloat16*, const BFloat16*, int64_t, int64_t, ColOf) {
  __builtin_trap();
}
template <int NV>
void pack_amx_panel_by_rows(BFloat16*, const BFloat16*, int64_t, int64_t, int64_t, int64_t) {
  __builtin_trap();
}
template <int NV>
inline void amx_panel_product(const BFloat16*, int64_t, int64_t, const BFloat16*, int64_t, float*,
                              int64_t) {
  __builtin_trap();
}
#endif

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
