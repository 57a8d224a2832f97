// The per-step product of the packed recurrence: W_hh (or W_hr, or their transposes) packed once
// per call into k-major panels of NV SIMD vectors, and the register-blocked micro-kernel that
// streams them (the architecture: recurrence_impl.h).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "panel_gemm.h is included by the per-ISA translation units only"
#endif

#include <cstdint>

#include "recurrence_common.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// ------------------------------------------------------------------------------ packing
// dest[((panel * K + k) * NV + v) * W + w] = src[col * stride_col + k * stride_k], where
// col = col_of(panel, v, w), or 0 where col_of returns -1 (padding past the last unit/column).
// Two loop orders, so that the source is always read with unit stride: along k when the source
// rows are contiguous in k (forward W_hh, W_hr^T), along the columns otherwise. The source may
// be of a storage type (storage.h): the panels are always in the compute type T.
template <typename T, int NV, typename S, typename ColOf>
void pack_panels(T* dest, const S* src, int64_t K, int64_t stride_col, int64_t stride_k,
                 int64_t panel_begin, int64_t panel_end, ColOf col_of) {
  constexpr int W = kWidth<T>;
  constexpr int NW = NV * W;
  using V = Vec<T, W>;
  for (int64_t pan = panel_begin; pan < panel_end; ++pan) {
    T* out = dest + pan * K * NW;
    for (int v = 0; v < NV; ++v) {
      // The W columns of vector v: consecutive source columns base .. base+valid-1, then padding
      // (always so for the panels built here; checked, with a plain copy otherwise).
      const int64_t base = col_of(pan, v, 0);
      int valid = 0;
      bool consecutive = true;
      for (int w = 0; w < W; ++w) {
        const int64_t col = col_of(pan, v, w);
        if (col < 0) continue;
        consecutive = consecutive && col == base + w && valid == w;
        ++valid;
      }
      T* o = out + v * W;
      if (valid == 0) {
        for (int64_t k = 0; k < K; ++k) V::zero().store(o + k * NW);
      } else if (consecutive && stride_col == 1) {
        // Columns contiguous in the source: one (partial) vector copy per k.
        for (int64_t k = 0; k < K; ++k) {
          load_as<V>(src + base + k * stride_k, valid).store(o + k * NW);
        }
      } else if (consecutive && stride_k == 1) {
        // Columns are source rows, contiguous along k: transpose W x W tiles in registers.
        const S* in = src + base * stride_col;
        int64_t k = 0;
        for (; k + W <= K; k += W) {
          V tile[W];
          for (int w = 0; w < W; ++w) {
            tile[w] = w < valid ? load_as<V>(in + w * stride_col + k) : V::zero();
          }
          transpose<T, W>(tile);
          for (int i = 0; i < W; ++i) tile[i].store(o + (k + i) * NW);
        }
        for (; k < K; ++k) {
          for (int w = 0; w < W; ++w) {
            o[k * NW + w] = w < valid ? to_compute<T>(in[w * stride_col + k]) : T(0);
          }
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          for (int w = 0; w < W; ++w) {
            const int64_t col = col_of(pan, v, w);
            o[k * NW + w] = col >= 0 ? to_compute<T>(src[col * stride_col + k * stride_k]) : T(0);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ the product
// Depth of one pass over a panel: the panel's slice of kDepth rows (NV*W elements each, ~64 KB)
// is read once per block of MR batch rows, from L2 (256 KB and up on any current x86 core), which
// feeds the micro-kernel faster than it consumes (AVX-512: 256 bytes per 24 FMAs). A slice sized
// for L1 (20 KB) cut a deep K into more passes, each storing and reloading the partial sums, and
// was slower. Measured on the 2-core Zen 4 VM (AVX-512, fp32, two threads, same process,
// alternating builds, T=100): LSTM B=64 H=512 inference 146.0 -> 141.5 ms, B=16 H=256 9.0 ->
// 8.7 ms, GRU B=64 H=256 26.2 -> 25.5 ms, LSTM B=64 T=50 H=256 training 60.2 -> 59.4 ms; slices
// of 128 and 512 KB were no faster than 64 KB.
template <typename T, int NV>
constexpr int64_t kDepth = imax(32, (64 * 1024 / (NV * kWidth<T> * static_cast<int>(sizeof(T)))) / 8 * 8);

// Packed weights a thread streams per step, above which they no longer stay in its L2 between
// steps (L2 is 1-2 MB per core on current x86 servers, 256 KB-1 MB on desktops) and the next
// slice is software-prefetched. Below it the prefetches only compete with the product's own
// loads: on the 2-core SPR VM they made B=1 H=64..256 (64-512 KB) 25-55% slower.
constexpr int64_t kPrefetchStreamBytes = 1 << 20;

template <typename T, int NV>
struct PanelGemm {
  static constexpr int W = kWidth<T>;
  static constexpr int MR = kAccRegs / NV > 0 ? kAccRegs / NV : 1;
  using V = Vec<T, W>;
  using Acc = V[MR][NV];

  template <int M, typename Block>
  static FUSEDRNN_VEC_INLINE void fma_step(const T* a, int64_t lda, int64_t k, const T* panel,
                                           Block& acc) {
    const T* bk = panel + k * NV * W;
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::load(bk + v * W);
#pragma GCC unroll 24
    for (int i = 0; i < M; ++i) {
      const V ai(a[i * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = ai * b[v] + acc[i][v];
    }
  }

  // acc[0..M) += A[0..M, k0..k1) x panel[k0..k1). With few rows (small batch) the M*NV
  // accumulators alone cannot hide the FMA latency, so consecutive k go to SPLIT independent
  // accumulator sets that are summed at the end.
  // The micro-kernel is forced inline (into PanelGemm::run), and its sums live in a local block
  // for the whole loop. When the forward became a template on the storage type too, GCC stopped
  // inlining it; through the reference `acc` it then had to assume that each store of a sum may
  // change what `a` and `panel` point to, and kept every sum in memory: the native LSTM forward
  // at B=32 H=256 on one thread took 26 ms instead of 15.
  template <int M>
  static FUSEDRNN_VEC_INLINE void kernel(const T* a, int64_t lda, int64_t k0, int64_t k1,
                                         const T* panel, Acc& acc) {
    V sum[M][NV];
    for (int i = 0; i < M; ++i) {
      for (int v = 0; v < NV; ++v) sum[i][v] = acc[i][v];
    }
    accumulate<M>(a, lda, k0, k1, panel, sum);
    for (int i = 0; i < M; ++i) {
      for (int v = 0; v < NV; ++v) acc[i][v] = sum[i][v];
    }
  }

  template <int M>
  static FUSEDRNN_VEC_INLINE void accumulate(const T* a, int64_t lda, int64_t k0, int64_t k1,
                                             const T* panel, V (&acc)[M][NV]) {
    constexpr int kSets = kAccRegs / (M * NV);
    constexpr int SPLIT = kSets < 1 ? 1 : (kSets > 4 ? 4 : kSets);
    if constexpr (SPLIT == 1) {
      for (int64_t k = k0; k < k1; ++k) fma_step<M>(a, lda, k, panel, acc);
    } else {
      V part[SPLIT - 1][M][NV];
      for (int j = 0; j < SPLIT - 1; ++j) {
        for (int i = 0; i < M; ++i) {
          for (int v = 0; v < NV; ++v) part[j][i][v] = V::zero();
        }
      }
      int64_t k = k0;
      for (; k + SPLIT <= k1; k += SPLIT) {
        fma_step<M>(a, lda, k, panel, acc);
#pragma GCC unroll 4
        for (int j = 0; j < SPLIT - 1; ++j) fma_step<M>(a, lda, k + 1 + j, panel, part[j]);
      }
      for (; k < k1; ++k) fma_step<M>(a, lda, k, panel, acc);
      for (int j = 0; j < SPLIT - 1; ++j) {
        for (int i = 0; i < M; ++i) {
          for (int v = 0; v < NV; ++v) acc[i][v] += part[j][i][v];
        }
      }
    }
  }

  template <int M = MR>
  static FUSEDRNN_VEC_INLINE void kernel_rows(int m, const T* a, int64_t lda, int64_t k0,
                                              int64_t k1, const T* panel, Acc& acc) {
    if constexpr (M > 1) {
      if (m < M) {
        kernel_rows<M - 1>(m, a, lda, k0, k1, panel, acc);
        return;
      }
    }
    kernel<M>(a, lda, k0, k1, panel, acc);
  }

  // Scratch for the partial sums of a deep product (K > kDepth): panels x rows x NV*W.
  static int64_t scratch_elems(int64_t panels, int64_t rows, int64_t K) {
    return K > kDepth<T, NV> ? panels * rows * NV * W : 0;
  }

  // For panels [panel_begin, panel_end) and rows [0, rows): acc = bias + A[rows, K] x panel,
  // then epi(panel, first_row, row_count, acc). A deep K runs in slices of kDepth (the panel
  // slice stays in L1 across the row blocks); partial sums wait in `scratch` in between.
  template <typename Epi>
  static void run(const T* a, int64_t lda, int64_t rows, int64_t K, const T* packed,
                  const T* bias_packed, int64_t panel_begin, int64_t panel_end, T* scratch,
                  Epi&& epi) {
    run(a, lda, rows, K, packed, bias_packed, panel_begin, panel_end, scratch, epi,
        [](int64_t, int64_t, int) {});
  }

  // prefetch(panel, first_row, row_count) runs before the last slice of a row block: the
  // epilogue's rows are spread over memory (one line per gate per batch row, 4 KB+ apart), which
  // no hardware prefetcher follows, so without it each epilogue waits on cache misses.
  // reversed: visit the panels from the last to the first (each panel's own k order, hence every
  // output's arithmetic, is unchanged). A caller that alternates the direction from one step to
  // the next (serpentine order) starts each step on the panels the previous step touched last,
  // which are still in L1/L2; in one fixed order an LRU cache smaller than the panels evicts
  // every panel just before it is needed again.
  template <typename Epi, typename Prefetch>
  static void run(const T* a, int64_t lda, int64_t rows, int64_t K, const T* packed,
                  const T* bias_packed, int64_t panel_begin, int64_t panel_end, T* scratch,
                  Epi&& epi, Prefetch&& prefetch, bool reversed = false) {
    constexpr int64_t kc = kDepth<T, NV>;
    const int64_t slices = K > kc ? ceil_div(K, kc) : 1;
    const int64_t panel_elems = K * NV * W;
    // With one row block per slice (small batch) there is no later block to hide the prefetch
    // behind: it only bursts ahead of the hardware prefetcher (B=1 H=1024: ~8% slower).
    const bool prefetch_stream =
        rows > MR && (panel_end - panel_begin) * panel_elems * static_cast<int64_t>(sizeof(T)) >
                         kPrefetchStreamBytes;
    for (int64_t j = 0; j < panel_end - panel_begin; ++j) {
      const int64_t pan = reversed ? panel_end - 1 - j : panel_begin + j;
      const T* panel = packed + pan * panel_elems;
      // The panel visited after this one (none after the last).
      const int64_t next_pan = j + 1 < panel_end - panel_begin ? (reversed ? pan - 1 : pan + 1) : -1;
      T* part = slices > 1 ? scratch + pan * rows * NV * W : nullptr;
      for (int64_t sl = 0; sl < slices; ++sl) {
        const int64_t k0 = sl * kc, k1 = slices > 1 ? imin(K, k0 + kc) : K;
        const bool last = sl + 1 == slices;
        // The data read after this slice (the next slice of this panel, or the start of the next
        // panel) is pulled into L2 a piece per row block, so that the first row block of the
        // next slice does not wait on L3/DRAM (the hardware prefetcher stops at every 4 KB
        // page, and a large W_hh does not stay in L2 between steps).
        const char* ahead = reinterpret_cast<const char*>(
            last ? packed + (next_pan < 0 ? 0 : next_pan) * panel_elems : panel + k1 * NV * W);
        const int64_t ahead_bytes =
            last && next_pan < 0 ? 0 : (k1 - k0) * NV * W * static_cast<int64_t>(sizeof(T));
        const int64_t blocks = imax(1, ceil_div(rows, MR));  // rows may be 0 (all padded)
        const int64_t chunk = round_up(ceil_div(ahead_bytes, blocks), 64);
        for (int64_t r0 = 0; r0 < rows; r0 += MR) {
          const int m = static_cast<int>(imin(MR, rows - r0));
          if (prefetch_stream) {
            const int64_t from = (r0 / MR) * chunk, to = imin(from + chunk, ahead_bytes);
            for (int64_t off = from; off < to; off += 64) __builtin_prefetch(ahead + off, 0, 2);
          }
          Acc acc;
          if (sl == 0) {
            for (int i = 0; i < MR; ++i) {
              for (int v = 0; v < NV; ++v) {
                acc[i][v] = bias_packed ? V::load(bias_packed + (pan * NV + v) * W) : V::zero();
              }
            }
          } else {
            for (int i = 0; i < m; ++i) {
              for (int v = 0; v < NV; ++v) acc[i][v] = V::load(part + ((r0 + i) * NV + v) * W);
            }
          }
          if (last) prefetch(pan, r0, m);
          kernel_rows(m, a + r0 * lda, lda, k0, k1, panel, acc);
          if (last) {
            epi(pan, r0, m, acc);
          } else {
            for (int i = 0; i < m; ++i) {
              for (int v = 0; v < NV; ++v) acc[i][v].store(part + ((r0 + i) * NV + v) * W);
            }
          }
        }
      }
    }
  }
};

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
