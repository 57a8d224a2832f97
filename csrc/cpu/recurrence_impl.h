// The CPU recurrence, written once and compiled per instruction set (recurrence_isa_*.cpp define
// FUSEDRNN_CPU_ISA, FUSEDRNN_CPU_VEC_BYTES and FUSEDRNN_CPU_ACC_REGS, then include this file).
//
// One call runs one direction of one layer over the whole sequence (DESIGN.md, "The one idea"):
//
//   forward, per step:  pre = h_{t-1} W_hh^T + b_hh (+ xproj_t)  ->  cell update  ->  h_t
//   backward, per step: d_pre = cell backward(d_h_t)  ->  d_h_{t-1} = d_pre W_hh (+ direct part)
//
// The per-step product is a small GEMM [B, K] x [K, N]. W_hh is packed once per call into
// "panels": a panel is NV SIMD vectors wide (NV*W output columns) and K deep, stored k-major, so
// the micro-kernel streams it with unit stride and keeps an MR x NV block of accumulators in
// registers. In the forward panels the NV vectors are the G gates of the SAME W hidden units, so
// when the dot products finish, the registers hold every pre-activation of those units and the
// cell update (fusedrnn/cell_math.h, instantiated on SIMD vectors) runs right there, without a
// round trip through memory. At large steps (kDeferredMinStepBytes) the sums take one round trip
// through a small buffer instead, so that the update can walk each batch row's xproj, gates and
// outputs front to back after the product (the epilogue's scattered lines were cache misses in
// series). At small batch and short sequences the forward skips the pack and
// reads W_hh in place (InPlaceDots, forward_in_place), leaving the same registers to the cell
// update. Threads own contiguous ranges of panels (hence of hidden units); the cell state of a
// unit never leaves its thread and one barrier per step publishes h_t.
// The backward product d_pre W_hh has output columns over the state (P); the same thread owns
// the same units in the pointwise part and in the product, so it too needs one barrier per step.
// A projected LSTM (proj_size) adds a second product (r W_hr^T forward, d_h W_hr backward) and
// a second barrier.
//
// Workspace (per direction, carved by the layouts below): the packed weights, double-buffered
// h (forward) or d_pre (backward) so that step s+1 can start writing while slow threads still
// read step s, and the per-unit states (c, d_h, d_c).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "recurrence_impl.h is included by the per-ISA translation units only"
#endif

#include <cstdint>
#include <cstring>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/params.h"
#include "amx_tiles.h"
#include "recurrence_isa.h"
#include "simd_vec.h"
#include "storage.h"
#include "thread_team.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// Accumulator registers the micro-kernel may use: 12 of 16 (SSE/AVX2), 24 of 32 (AVX-512); the
// rest hold the W_hh vectors of one k and the broadcast of h.
constexpr int kAccRegs = FUSEDRNN_CPU_ACC_REGS;
template <typename T>
constexpr int kWidth = FUSEDRNN_CPU_VEC_BYTES / static_cast<int>(sizeof(T));

constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ------------------------------------------------------------------------------ sequence helpers
// Processing step s of row b: forward t = s; reverse t = lengths[b]-1-s. Row b is valid while
// s < lengths[b]; a padded step's rows are at t = s (the padded t run over [lengths[b], T)).
struct Steps {
  const int64_t* lengths;
  int64_t seq_len;
  bool reverse;
  bool active(int64_t b, int64_t s) const { return lengths == nullptr || s < lengths[b]; }
  int64_t time(int64_t b, int64_t s) const {
    if (!reverse) return s;
    return (lengths ? lengths[b] : seq_len) - 1 - s;
  }
  // The time index of the previous processed step (valid for s >= 1).
  int64_t prev_time(int64_t b, int64_t s) const { return reverse ? time(b, s) + 1 : s - 1; }
  // Rows [0, n) hold every row active at s (exact when lengths are sorted, as packed input is).
  int64_t rows_needed(int64_t s, int64_t batch) const {
    if (lengths == nullptr) return batch;
    for (int64_t b = batch; b > 0; --b) {
      if (s < lengths[b - 1]) return b;
    }
    return 0;
  }
};

template <typename T>
inline T* row_of(const SeqTensor& seq, int64_t t, int64_t b) {
  return static_cast<T*>(seq.data) + t * seq.stride_t + b * seq.stride_b;
}

// ------------------------------------------------------------------------------ saved gates
// One row of the gates saved for backward (params.h, saved_gate_count): gate k of unit u at
// row[k * H + u], LSTM i, f, g, o and GRU r, z, n, h_n. The recurrence and the cell step
// (cell_step_impl.h) write and read them only through these, W units (n valid) at u.
template <typename S, typename V>
inline void store_saved_gates(const LstmGates<V>& gate, S* row, int64_t H, int64_t u, int n) {
  store_as(row + u, gate.i, n);
  store_as(row + H + u, gate.f, n);
  store_as(row + 2 * H + u, gate.g, n);
  store_as(row + 3 * H + u, gate.o, n);
}
template <typename S, typename V>
inline void store_saved_gates(const GruGates<V>& gate, S* row, int64_t H, int64_t u, int n) {
  store_as(row + u, gate.r, n);
  store_as(row + H + u, gate.z, n);
  store_as(row + 2 * H + u, gate.n, n);
  store_as(row + 3 * H + u, gate.h_n, n);
}
template <typename V, typename S>
inline LstmGates<V> load_saved_lstm_gates(const S* row, int64_t H, int64_t u, int n) {
  return {load_as<V>(row + u, n), load_as<V>(row + H + u, n), load_as<V>(row + 2 * H + u, n),
          load_as<V>(row + 3 * H + u, n)};
}
template <typename V, typename S>
inline GruGates<V> load_saved_gru_gates(const S* row, int64_t H, int64_t u, int n) {
  GruGates<V> gate;
  gate.r = load_as<V>(row + u, n);
  gate.z = load_as<V>(row + H + u, n);
  gate.n = load_as<V>(row + 2 * H + u, n);
  gate.h_n = load_as<V>(row + 3 * H + u, n);
  return gate;
}

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
// Depth of one pass over a panel: the panel's slice of kDepth rows (NV*W elements each) is read
// once per block of MR batch rows, so it should stay in L1 (about 20 KB of the 32-48 KB).
template <typename T, int NV>
constexpr int64_t kDepth = imax(32, (20 * 1024 / (NV * kWidth<T> * static_cast<int>(sizeof(T)))) / 8 * 8);

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

// ------------------------------------------------------------------------------ in-place product
// Small batch (forward): the product reads W_hh where it lies, row-major [G*H, P], instead of
// packing it into panels first. At B=1 the pack (a register transpose of all of W_hh, ~15 GB/s)
// cost more than the whole recurrence of a short sequence (LSTM H=512 T=1: ~75% of the call),
// and the inference plan may not keep a packed copy across calls (a parameter written in place
// behind its version counter must still be seen), so every call paid it.
//
// Each output vector of a forward panel (gate g of W consecutive units) is W rows of W_hh,
// contiguous along k. Row w accumulates a vector of products row_w[k..k+W) * h[k..k+W) over
// the k chunks; a transpose-and-add tree then folds the W row vectors into ONE vector whose
// lane w is row w's dot product: the same register layout the packed product leaves, so the
// cell epilogue does not know which product ran. A projected LSTM reads W_hr ([P, H]) in place
// the same way, under the same rule (forward_in_place with P rows of depth H).

// Batch rows up to which the forward may read W_hh in place (InPlaceDots keeps their sums on the
// stack).
constexpr int64_t kInPlaceMaxBatch = 2;

// Whether the forward reads W_hh in place rather than packing it. The pack transposes all of
// W_hh once per call (about log2(W) / W shuffles per weight); the in-place product instead folds
// W row vectors into each output vector at every step and for every batch row (2 shuffles per
// output). By that count the in-place product wins while seq_len * batch * 2 * W / log2(W)
// <= depth (P), the rule below. Measured (2-core SPR VM, AVX-512 fp32, whole native calls at
// B=1): LSTM H=64 breaks even near T=10 (rule: 8), H=128 between T=10 and 100 (rule: 16).
// A W_hh of 512 KB or more (LSTM H >= 256 fp32) does not stay in the L1/L2 of the threads
// between steps, the product streams it either way and the in-place one was no slower per step
// (LSTM H=256 T=100: 553 against 612 us; H=512: 3.2 against 3.6 ms), so at B=1 it is taken
// at any length. The same holds for bfloat16 weights, read as pairs (InPlaceDots::dots): half
// the bytes, and at H=512 faster than float (LSTM B=1 T=100, native forward: 1.79 against
// 2.59 ms; H=256 0.53 against 0.51 ms). (Widening each bfloat16 weight on its own had doubled the
// time: 1.25 ms at H=256.)
template <typename T>
bool forward_in_place(int64_t seq_len, int64_t batch, int64_t rows, int64_t depth) {
  constexpr int W = kWidth<T>;
  constexpr int log2w = W >= 16 ? 4 : W >= 8 ? 3 : W >= 4 ? 2 : 1;
  if (batch > kInPlaceMaxBatch) return false;
  if (batch == 1 && rows * depth * static_cast<int64_t>(sizeof(T)) >= (int64_t(512) << 10)) {
    return true;
  }
  return seq_len * batch * 2 * W <= depth * log2w;
}

// Loads p[0..n) (n in 1..W), the other lanes zero, without touching memory past p[n-1]: the
// K tail of a W_hh row, whose next elements may lie past the end of the tensor.
template <typename T, int W>
FUSEDRNN_VEC_INLINE Vec<T, W> load_first(const T* p, int n) {
  using V = Vec<T, W>;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) * W == 64) {
    const auto mask = static_cast<__mmask16>((1u << n) - 1);
    if constexpr (sizeof(T) == 4) {
      return V::of(reinterpret_cast<typename V::Raw>(_mm512_maskz_loadu_ps(mask, p)));
    } else {
      return V::of(reinterpret_cast<typename V::Raw>(_mm512_maskz_loadu_pd(
          static_cast<__mmask8>(mask), p)));
    }
  }
#endif
#if defined(__AVX2__)
  if constexpr (sizeof(T) * W == 32) {
    using I = typename V::IRaw;
    I lane;
    for (int i = 0; i < W; ++i) lane[i] = i;
    const I mask = lane < static_cast<typename V::Int>(n);  // all-ones where loaded
    if constexpr (sizeof(T) == 4) {
      return V::of(reinterpret_cast<typename V::Raw>(
          _mm256_maskload_ps(p, reinterpret_cast<__m256i>(mask))));
    } else {
      return V::of(reinterpret_cast<typename V::Raw>(
          _mm256_maskload_pd(p, reinterpret_cast<__m256i>(mask))));
    }
  }
#endif
  return V::load_partial(p, n);
}

// load_first for a weight row of any storage type (a bfloat16 row is widened, load_as reading
// exactly n elements).
template <typename T, int W, typename S>
FUSEDRNN_VEC_INLINE Vec<T, W> load_first_as(const S* p, int n) {
  if constexpr (std::is_same_v<S, T>) {
    return load_first<T, W>(p, n);
  } else {
    return load_as<Vec<T, W>>(p, n);
  }
}

template <typename T>
struct InPlaceDots {
  static constexpr int W = kWidth<T>;
  using V = Vec<T, W>;
  // Independent accumulator sets over consecutive k chunks: W rows give W chains, which hide
  // the FMA latency (4 cycles, 2 ports) only from W = 8 on.
  static constexpr int kSets = W >= 8 ? 1 : 8 / W;

  // Folds acc[0..W) into one vector, lane w = the sum of acc[w]'s lanes. Stage s pairs
  // acc[i] (rows whose index has bit s clear) with acc[i+s]: lanes with bit s clear take
  // x[l] + x[l+s], lanes with bit s set y[l-s] + y[l], so after the stages s = 1, 2, ..., W/2
  // the bits of a lane's index are the bits of its row's.
  template <int S = 1>
  static FUSEDRNN_VEC_INLINE V fold(V (&acc)[W]) {
    if constexpr (S >= W) {
      return acc[0];
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < W; i += 2 * S) {
        const auto x = acc[i].v, y = acc[i + S].v;
        acc[i] = V::of(swap_blocks<T, W, S, false>(x, y, std::make_index_sequence<W>{}) +
                       swap_blocks<T, W, S, true>(x, y, std::make_index_sequence<W>{}));
      }
      return fold<2 * S>(acc);
    }
  }

  // Shuffle masks taking the even and the odd elements of two vectors' concatenation.
  template <size_t... J>
  static constexpr typename V::IRaw lanes_from(int first, std::index_sequence<J...>) {
    return typename V::IRaw{static_cast<typename V::Int>(2 * J + first)...};
  }
  static constexpr typename V::IRaw kEvenLanes = lanes_from(0, std::make_index_sequence<W>{});
  static constexpr typename V::IRaw kOddLanes = lanes_from(1, std::make_index_sequence<W>{});

  // Lane w = rows[w] . h over k in [0, K), for rows[w] = first + min(w, n - 1) * ld: the rows
  // past the last unit (n < W, the tail of H) repeat the last one, and their lanes are never
  // published. The rows may be of a storage type (storage.h), h is in T.
  template <bool kFull, typename S>
  static FUSEDRNN_VEC_INLINE V dots(const S* first, int64_t ld, int n, const T* h, int64_t K) {
    const S* row[W];
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) row[w] = first + (kFull ? w : imin(w, n - 1)) * ld;
    V acc[kSets][W];
#pragma GCC unroll 16
    for (int j = 0; j < kSets; ++j) {
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[j][w] = V::zero();
    }
    int64_t k = 0;
    if constexpr (std::is_same_v<S, BFloat16>) {
      // bfloat16 rows, 2W weights per load, split into the even and the odd k: in a 32-bit lane
      // holding weights k (low half) and k+1 (high half), the float of the first is the lane
      // shifted left by 16, the float of the second the lane with its low half cleared. h is
      // split to match, once per chunk for all W rows. Two ALU operations for 2W weights, where
      // widening W weights took two (a widening load and a shift).
      using U32 = typename BitLanes<W>::U32;
      constexpr int odd = kSets > 1 ? 1 : 0;  // a second chain where the registers allow it
      for (; k + 2 * W <= K; k += 2 * W) {
        const V h0 = V::load(h + k), h1 = V::load(h + k + W);
        const V even_h = V::of(__builtin_shuffle(h0.v, h1.v, kEvenLanes));
        const V odd_h = V::of(__builtin_shuffle(h0.v, h1.v, kOddLanes));
#pragma GCC unroll 16
        for (int w = 0; w < W; ++w) {
          U32 pair;
          std::memcpy(&pair, row[w] + k, sizeof pair);
          const V even = V::of(reinterpret_cast<typename V::Raw>(pair << 16));
          const V odd_w = V::of(reinterpret_cast<typename V::Raw>(pair & 0xFFFF0000u));
          acc[0][w] = even * even_h + acc[0][w];
          acc[odd][w] = odd_w * odd_h + acc[odd][w];
        }
      }
    } else {
      for (; k + kSets * W <= K; k += kSets * W) {
#pragma GCC unroll 8
        for (int j = 0; j < kSets; ++j) {
          const V hv = V::load(h + k + j * W);
#pragma GCC unroll 16
          for (int w = 0; w < W; ++w) {
            acc[j][w] = load_as<V>(row[w] + k + j * W) * hv + acc[j][w];
          }
        }
      }
    }
    for (; k < K; k += W) {
      const int left = static_cast<int>(imin(W, K - k));
      const V hv = load_first<T, W>(h + k, left);
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) {
        acc[0][w] = load_first_as<T, W>(row[w] + k, left) * hv + acc[0][w];
      }
    }
#pragma GCC unroll 8
    for (int j = 1; j < kSets; ++j) {
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[0][w] += acc[j][w];
    }
    return fold(acc[0]);
  }

  // The product of panels [panel_begin, panel_end) for batch rows [0, rows): acc[b][v] = bias +
  // h_b w^T, then epi(panel, 0, rows, acc). w is [G * N, K], bias [G * N] or null; vector v of
  // a panel is gate v / UV of the outputs pan * UV * W + (v % UV) * W ... (< N): FwdPanel's
  // layout over W_hh (N = H), or plain columns over W_hr (G = 1, UV = NV, N = P). The
  // epilogue's operands are prefetched (prefetch(panel, 0, rows)) before the products, which
  // hide their misses. reversed: the serpentine order of PanelGemm::run.
  template <int NV, int UV, typename S, typename Epi, typename Prefetch>
  static void run(const T* h, int64_t ldh, int64_t rows, int64_t K, const S* w, const S* bias,
                  int64_t N, int64_t panel_begin, int64_t panel_end, Epi&& epi,
                  Prefetch&& prefetch, bool reversed) {
    V acc[kInPlaceMaxBatch][NV];
    for (int64_t j = 0; j < panel_end - panel_begin; ++j) {
      const int64_t pan = reversed ? panel_end - 1 - j : panel_begin + j;
      prefetch(pan, 0, static_cast<int>(rows));
      for (int v = 0; v < NV; ++v) {
        const int64_t u = pan * UV * W + (v % UV) * W;
        const int64_t row0 = (v / UV) * N + u;
        const int n = static_cast<int>(imin(W, N - u));
        for (int64_t b = 0; b < rows; ++b) {
          if (n <= 0) {
            acc[b][v] = V::zero();
            continue;
          }
          const T* hb = h + b * ldh;
          acc[b][v] = n == W ? dots<true>(w + row0 * K, K, n, hb, K)
                             : dots<false>(w + row0 * K, K, n, hb, K);
          if (bias) acc[b][v] += load_as<V>(bias + row0, n);
        }
      }
      epi(pan, 0, static_cast<int>(rows), acc);
    }
  }
};

// ------------------------------------------------------------------------------ workspace
struct Carver {
  int64_t size = 0;
  int64_t take(int64_t bytes) {
    const int64_t offset = size;
    size += round_up(imax(bytes, 0), 64);
    return offset;
  }
  // +64: the caller aligns the base pointer up to 64 bytes.
  int64_t total() const { return size + 64; }
};

inline char* aligned_base(void* workspace) {
  const auto addr = reinterpret_cast<uintptr_t>(workspace);
  return reinterpret_cast<char*>((addr + 63) & ~uintptr_t(63));
}

// Row stride of the per-step row buffers (h, d_pre, ...). The micro-kernel reads MR rows at
// once; with a power-of-two stride (H = 256, 1024, ...) every row of a column falls into the same
// L1 set and the rows evict each other (and 4K-alias with the stores), so the A operand would come
// from L2 on every k. One extra cache line per row spreads the rows over the sets.
template <typename T>
constexpr int64_t padded_ld(int64_t cols) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  return round_up(cols, line) + line;
}

// Forward panel shape per cell: LSTM and GRU put the G gates of W units in one panel; the Elman
// RNN has one gate, so its panel spans 4 vectors of units to keep enough accumulators busy.
template <CellKind C>
struct FwdPanel {
  static constexpr int kGates = gate_count(C);
  static constexpr int kUnitVecs = (C == CellKind::kLstm || C == CellKind::kGru) ? 1 : 4;
  static constexpr int kVecs = kGates * kUnitVecs;
};
// Panels over plain output columns (backward products, projections).
constexpr int kColVecs = 4;

// Input projection bytes per step (B x G*H elements) from which the forward's cell update runs
// after the whole step's product instead of in the product's epilogue. In the epilogue it visits,
// per panel, one line per gate of each row: rows lie G*H elements apart, and no hardware
// prefetcher follows that pattern, so with rows that are not in cache every line is a miss in
// series (LSTM B=32 H=256, one thread: ~70 us of a ~190 us step waited on xproj, the saved gates
// and out). After the product each row is read and written front to back, which the prefetchers
// stream, provided a thread's share of a row is long enough to stream: at least
// kDeferredMinRowBytes of each gate (256 fp32 units). Measured on the 2-core SPR VM, forward of
// a training call: LSTM B=32 H=256 bidirectional (one thread a direction) 18.9 -> 17.1 ms,
// B=64 H=512 34.5 -> 31 ms, GRU B=16 H=512 14.7 -> 13.1 ms; shorter shares (B=32 H=128 or
// B=16 H=256 on two threads) and smaller steps (B=8 H=128) were 5-17% slower deferred.
constexpr int64_t kDeferredMinStepBytes = 64 << 10;
constexpr int64_t kDeferredMinRowBytes = 1 << 10;

// The h, c and r row buffers are ld wide; lanes past H (or P) are padding. The packed product
// leaves zeros there, the in-place one copies of the last unit's value: no reader may use them
// (products read k < K, outputs and final states stop at H and P).
template <typename T, CellKind C>
struct FwdLayout {
  static constexpr int W = kWidth<T>;
  static constexpr int NV = FwdPanel<C>::kVecs;
  static constexpr int UV = FwdPanel<C>::kUnitVecs;
  int64_t units_per_panel, panels, proj_panels, ld;
  // Small batch: the product reads W_hh and b_hh in place (InPlaceDots), nothing is packed;
  // proj_in_place: the same for the projection's W_hr.
  bool in_place, proj_in_place;
  // can_defer: there is a `pre` buffer where the packed product can park each step's
  // pre-activations, for the cell update to run afterwards row by row (kDeferredMinStepBytes).
  bool can_defer;
  // amx: the product h_{t-1} W_hh^T runs as the bfloat16 VNNI product (amx_tiles.h: AMX tiles,
  // or VDPBF16PS in the avx512bf16 build): bfloat16 layers of those builds that would pack W_hh
  // (a projected LSTM's r W_hr^T stays on FMAs). W_hh is packed into
  // amx_pack, h is kept in bfloat16 too (double-buffered, hbf: the product's A operand) and the
  // sums always take the round trip through `pre` (amx_rows(B) rows: a tile store writes 16).
  bool amx;
  int64_t w_pack, bias_pack, wr_pack, amx_pack, h, hbf, c, r, pre, scratch, proj_scratch, bytes;
  explicit FwdLayout(const RecurrenceFwdParams& p) {
    const int64_t H = p.hidden, P = p.state, B = p.batch;
    const bool projected = C == CellKind::kLstm && P != H;
    in_place = forward_in_place<T>(p.seq_len, B, gate_count(C) * H, P);
    proj_in_place = projected && forward_in_place<T>(p.seq_len, B, P, H);
    units_per_panel = UV * W;
    panels = ceil_div(H, units_per_panel);
    proj_panels = projected ? ceil_div(P, kColVecs * W) : 0;
    ld = padded_ld<T>(round_up(imax(H, P), kColVecs * W));
    amx = kVnniBf16Build && p.dtype == DType::kBFloat16 && !in_place && NV <= kAmxMaxVecs &&
          W == kAmxCols && amx_tiles_granted();
    can_defer = amx || (!in_place && B * gate_count(C) * H * static_cast<int64_t>(sizeof(T)) >=
                                         kDeferredMinStepBytes);
    const int64_t e = sizeof(T), bf16 = 2;
    Carver carve;
    w_pack = carve.take(in_place || amx ? 0 : panels * P * NV * W * e);
    bias_pack = carve.take(in_place ? 0 : panels * NV * W * e);
    wr_pack = carve.take(proj_in_place ? 0 : proj_panels * H * kColVecs * W * e);
    amx_pack = carve.take(amx ? panels * amx_panel_elems(NV, P) * bf16 : 0);
    h = carve.take(2 * B * ld * e);
    hbf = carve.take(amx ? 2 * amx_rows(B) * amx_lda(P) * bf16 : 0);
    c = carve.take(C == CellKind::kLstm ? B * ld * e : 0);
    r = carve.take(projected ? B * ld * e : 0);
    pre = carve.take(can_defer ? (amx ? amx_rows(B) : B) * pre_row_elems() * e : 0);
    scratch = carve.take(in_place || amx ? 0 : PanelGemm<T, NV>::scratch_elems(panels, B, P) * e);
    proj_scratch = carve.take(
        proj_in_place ? 0 : PanelGemm<T, kColVecs>::scratch_elems(proj_panels, B, H) * e);
    bytes = carve.total();
  }
  // One batch row of `pre`: every panel's NV vectors, panel after panel, so that the cell
  // update of a row reads it front to back. The AMX product stores and reloads 16 rows of a
  // panel at a time: one more cache line per row keeps rows 2^n floats long out of one L1 set.
  int64_t pre_row_elems() const { return panels * NV * W + (amx ? W : 0); }
};

template <typename T, CellKind C>
struct BwdLayout {
  static constexpr int W = kWidth<T>;
  int64_t cols_per_panel, panels, proj_panels, ld, ldg;
  // amx: as FwdLayout's, for the product d_pre W_hh: W_hh packed into amx_pack, d_pre kept in
  // bfloat16 only (double-buffered, dpbf: nothing else reads d_pre, so the float dpre is not
  // carved) and the sums coming back through amx_sums (amx_rows(B) rows of amx_sums_ld floats).
  bool amx;
  int64_t amx_sums_ld;
  int64_t wt_pack, wr_pack, amx_pack, dh, dc, dpre, dpbf, amx_sums, dh_direct, dht, scratch,
      proj_scratch, bytes;
  explicit BwdLayout(const RecurrenceBwdParams& p) {
    const int64_t H = p.hidden, P = p.state, B = p.batch, G = gate_count(C);
    const bool projected = C == CellKind::kLstm && P != H;
    cols_per_panel = kColVecs * W;
    panels = ceil_div(P, cols_per_panel);
    proj_panels = projected ? ceil_div(H, cols_per_panel) : 0;
    ld = padded_ld<T>(round_up(imax(H, P), cols_per_panel));
    ldg = padded_ld<T>(round_up(G * H, W));
    amx = kVnniBf16Build && p.dtype == DType::kBFloat16 && W == kAmxCols && amx_tiles_granted();
    amx_sums_ld = panels * cols_per_panel + W;  // + a line: see FwdLayout::pre_row_elems
    const int64_t e = sizeof(T), bf16 = 2;
    Carver carve;
    wt_pack = carve.take(amx ? 0 : panels * G * H * kColVecs * W * e);
    wr_pack = carve.take(proj_panels * P * kColVecs * W * e);
    amx_pack = carve.take(amx ? panels * amx_panel_elems(kColVecs, G * H) * bf16 : 0);
    dh = carve.take(B * ld * e);
    dc = carve.take(C == CellKind::kLstm ? B * ld * e : 0);
    dpre = carve.take(amx ? 0 : 2 * B * ldg * e);
    dpbf = carve.take(amx ? 2 * amx_rows(B) * amx_lda(G * H) * bf16 : 0);
    amx_sums = carve.take(amx ? amx_rows(B) * amx_sums_ld * e : 0);
    dh_direct = carve.take(C == CellKind::kGru ? B * ld * e : 0);
    dht = carve.take(projected ? B * ld * e : 0);
    scratch = carve.take(amx ? 0 : PanelGemm<T, kColVecs>::scratch_elems(panels, B, G * H) * e);
    proj_scratch = carve.take(PanelGemm<T, kColVecs>::scratch_elems(proj_panels, B, P) * e);
    bytes = carve.total();
  }
};

// ------------------------------------------------------------------------------ forward
// T: the compute type; S: what the tensors hold (storage.h: T itself, or bfloat16 with T float).
template <typename T, CellKind C, typename S>
void forward_impl(const RecurrenceFwdParams& p, const Team& team) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using L = FwdLayout<T, C>;
  using V = Vec<T, W>;
  constexpr int NV = L::NV;
  constexpr int UV = L::UV;
  const L lay(p);
  const int64_t seq_len = p.seq_len, B = p.batch, H = p.hidden, P = p.state, ld = lay.ld;
  const bool projected = C == CellKind::kLstm && P != H;
  const Steps steps{p.lengths, seq_len, p.reverse};

  char* ws = aligned_base(p.workspace);
  T* w_pack = reinterpret_cast<T*>(ws + lay.w_pack);
  T* bias_pack = p.b_hh && !lay.in_place ? reinterpret_cast<T*>(ws + lay.bias_pack) : nullptr;
  T* wr_pack = reinterpret_cast<T*>(ws + lay.wr_pack);
  T* hbuf[2] = {reinterpret_cast<T*>(ws + lay.h), reinterpret_cast<T*>(ws + lay.h) + B * ld};
  // The AMX product's bfloat16 copies of h (FwdLayout::amx; null otherwise), amx_ld apart.
  const int64_t amx_ld = amx_lda(P), amx_row_count = amx_rows(B);
  BFloat16* hbf[2] = {nullptr, nullptr};
  if (lay.amx) {
    hbf[0] = reinterpret_cast<BFloat16*>(ws + lay.hbf);
    hbf[1] = hbf[0] + amx_row_count * amx_ld;
  }
  BFloat16* amx_pack = reinterpret_cast<BFloat16*>(ws + lay.amx_pack);
  T* cbuf = reinterpret_cast<T*>(ws + lay.c);
  T* rbuf = reinterpret_cast<T*>(ws + lay.r);
  T* scratch = reinterpret_cast<T*>(ws + lay.scratch);
  T* proj_scratch = reinterpret_cast<T*>(ws + lay.proj_scratch);
  T* pre = reinterpret_cast<T*>(ws + lay.pre);
  const S* w_hh = static_cast<const S*>(p.w_hh);
  const S* b_hh = static_cast<const S*>(p.b_hh);
  const S* w_hr = static_cast<const S*>(p.w_hr);

  // This thread's panels: units [unit_begin, unit_end) and, projected, state columns.
  int64_t pan_begin, pan_end, ppan_begin = 0, ppan_end = 0;
  split_range(lay.panels, team.rank, team.size, pan_begin, pan_end);
  if (projected) split_range(lay.proj_panels, team.rank, team.size, ppan_begin, ppan_end);
  // (Clamped: a thread with no panels gets an empty range.)
  const int64_t unit_begin = imin(pan_begin * lay.units_per_panel, H);
  const int64_t unit_end = imin(pan_end * lay.units_per_panel, H);
  const int64_t col_begin = imin(ppan_begin * kColVecs * W, P);
  const int64_t col_end = imin(ppan_end * kColVecs * W, P);
  const bool deferred =
      lay.amx || (lay.can_defer && (unit_end - unit_begin) * static_cast<int64_t>(sizeof(T)) >=
                                       kDeferredMinRowBytes);

  // Each thread packs the panels it will read (they stay in its own cache), and configures its
  // AMX tiles for them (FwdLayout::amx) until it returns.
  AmxTileScope tiles(lay.amx);
  const int64_t upp = lay.units_per_panel;
  auto gate_row = [&](int64_t pan, int v, int w) -> int64_t {
    const int64_t g = v / UV, u = pan * upp + (v % UV) * W + w;
    return u < H ? g * H + u : -1;
  };
  if (lay.amx) {
    if constexpr (std::is_same_v<S, BFloat16>) {
      for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
        pack_amx_panel<NV>(amx_pack + pan * amx_panel_elems(NV, P), w_hh, P, P,
                           [&](int v, int w) { return gate_row(pan, v, w); });
      }
    }
  } else if (!lay.in_place) {
    pack_panels<T, NV>(w_pack, w_hh, P, P, 1, pan_begin, pan_end, gate_row);
  }
  if (bias_pack) pack_panels<T, NV>(bias_pack, b_hh, 1, 1, 0, pan_begin, pan_end, gate_row);
  if (projected && !lay.proj_in_place) {
    pack_panels<T, kColVecs>(
        wr_pack, w_hr, H, H, 1, ppan_begin, ppan_end, [&](int64_t pan, int v, int w) -> int64_t {
          const int64_t col = (pan * kColVecs + v) * W + w;
          return col < P ? col : -1;
        });
  }
  if (team.rank == 0) {
    std::memset(hbuf[0], 0, sizeof(T) * 2 * B * ld);
    if (p.h0) {
      for (int64_t b = 0; b < B; ++b) {
        convert_row(hbuf[0] + b * ld, static_cast<const S*>(p.h0) + b * P, P);
      }
    }
    if (lay.amx) {
      // Zeros past P and past B: a padding k must not meet a NaN (0 x NaN), and the sums of
      // padding rows are never read.
      std::memset(static_cast<void*>(hbf[0]), 0, sizeof(BFloat16) * 2 * amx_row_count * amx_ld);
      if (p.h0) {
        for (int64_t b = 0; b < B; ++b) {
          std::memcpy(static_cast<void*>(hbf[0] + b * amx_ld),
                      static_cast<const char*>(p.h0) + b * P * sizeof(S), sizeof(S) * P);
        }
      }
    }
    if constexpr (C == CellKind::kLstm) {
      std::memset(cbuf, 0, sizeof(T) * B * ld);
      if (p.c0) {
        for (int64_t b = 0; b < B; ++b) {
          convert_row(cbuf + b * ld, static_cast<const S*>(p.c0) + b * H, H);
        }
      }
    }
  }
  team.sync();

  S* gates_data = static_cast<S*>(p.gates.data);
  S* c_seq_data = static_cast<S*>(p.c_seq.data);
  S* r_seq_data = static_cast<S*>(p.r_seq.data);

  for (int64_t s = 0; s < seq_len; ++s) {
    const T* h_prev = hbuf[s & 1];
    T* h_next = hbuf[(s + 1) & 1];
    BFloat16* hbf_next = hbf[(s + 1) & 1];
    const int64_t rows = steps.rows_needed(s, B);
    // h_t of row b, units (or a projected LSTM's state columns) [u, u + n), to the next step's
    // product (and its bfloat16 operand).
    auto publish_h = [&](int64_t b, int64_t u, const V& h, int n) {
      h.store(h_next + b * ld + u);
      if constexpr (std::is_same_v<T, float>) {
        if (hbf_next) store_as(hbf_next + b * amx_ld + u, h, n);
      }
    };
    // A padded row b: h_{t-1} carries over for columns [begin, end) (and its bfloat16 copy),
    // the output row is zero.
    auto keep_h = [&](int64_t b, int64_t begin, int64_t end) {
      std::memcpy(h_next + b * ld + begin, h_prev + b * ld + begin, sizeof(T) * (end - begin));
      if (hbf_next) {
        std::memcpy(static_cast<void*>(hbf_next + b * amx_ld + begin),
                    hbf[s & 1] + b * amx_ld + begin, sizeof(BFloat16) * (end - begin));
      }
      zero_row(row_of<S>(p.out, s, b) + begin, end - begin);
    };

    auto cell_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
      for (int i = 0; i < m; ++i) {
        const int64_t b = r0 + i;
        if (!steps.active(b, s)) continue;
        const int64_t t = steps.time(b, s);
        const S* x = row_of<const S>(p.xproj, t, b);
        S* out = row_of<S>(p.out, t, b);
        for (int uv = 0; uv < UV; ++uv) {
          const int64_t u = pan * upp + uv * W;
          if (u >= H) break;
          const int n = static_cast<int>(imin(W, H - u));
          if constexpr (C == CellKind::kLstm) {
            const V c_prev = V::load(cbuf + b * ld + u);
            V c_next, r;
            const auto gate = lstm_forward(acc[i][0] + load_as<V>(x + u, n),
                                           acc[i][1] + load_as<V>(x + H + u, n),
                                           acc[i][2] + load_as<V>(x + 2 * H + u, n),
                                           acc[i][3] + load_as<V>(x + 3 * H + u, n),
                                           c_prev, c_next, r);
            c_next.store(cbuf + b * ld + u);
            if (projected) {
              r.store(rbuf + b * ld + u);
              if (r_seq_data) store_as(row_of<S>(p.r_seq, t, b) + u, r, n);
            } else {
              publish_h(b, u, r, n);
              store_as(out + u, r, n);
            }
            if (gates_data) store_saved_gates(gate, row_of<S>(p.gates, t, b), H, u, n);
            if (c_seq_data) store_as(row_of<S>(p.c_seq, t, b) + u, c_next, n);
          } else if constexpr (C == CellKind::kGru) {
            V h;
            const auto gate = gru_forward(
                load_as<V>(x + u, n), load_as<V>(x + H + u, n), load_as<V>(x + 2 * H + u, n),
                acc[i][0], acc[i][1], acc[i][2], V::load(h_prev + b * ld + u), h);
            publish_h(b, u, h, n);
            store_as(out + u, h, n);
            if (gates_data) store_saved_gates(gate, row_of<S>(p.gates, t, b), H, u, n);
          } else {
            const V h = rnn_forward(p.cell, acc[i][uv] + load_as<V>(x + u, n));
            publish_h(b, u, h, n);
            store_as(out + u, h, n);
          }
        }
      }
    };
    auto cell_prefetch = [&](int64_t pan, int64_t r0, int m) {
      for (int i = 0; i < m; ++i) {
        const int64_t b = r0 + i;
        if (!steps.active(b, s)) continue;
        const int64_t t = steps.time(b, s);
        const S* x = row_of<const S>(p.xproj, t, b) + pan * upp;
        S* gs = gates_data ? row_of<S>(p.gates, t, b) + pan * upp : nullptr;
        for (int g = 0; g < G; ++g) {
          for (int64_t e = 0; e < upp; e += 64 / static_cast<int64_t>(sizeof(S))) {
            __builtin_prefetch(x + g * H + e, 0, 3);
            if (gs) __builtin_prefetch(gs + g * H + e, 1, 3);
          }
        }
      }
    };
    // Serpentine panel order (odd steps backwards): W_hh of a small layer is a little larger
    // than L1 (LSTM H=64 fp32: 64 KB against 48 KB), and the turn keeps most of it there. The
    // in-place product gains as much (B=1, one thread: H=64 0.71 against 0.88 us a step, H=512
    // 111 against 148 us).
    if (lay.in_place) {
      InPlaceDots<T>::template run<NV, UV>(h_prev, ld, rows, P, w_hh, b_hh, H, pan_begin,
                                           pan_end, cell_epilogue, cell_prefetch, (s & 1) != 0);
    } else if (deferred) {
      // The product parks its sums in `pre`; then each row's cell update walks the row's units
      // in order (kDeferredMinStepBytes says why). Each thread parks and reads only its own
      // panels.
      const int64_t pre_ld = lay.pre_row_elems();
      auto park = [&](int64_t pan, int64_t r0, int m, auto& acc) {
        for (int i = 0; i < m; ++i) {
          T* row = pre + (r0 + i) * pre_ld + pan * NV * W;
          for (int v = 0; v < NV; ++v) acc[i][v].store(row + v * W);
        }
      };
      if (lay.amx) {
        // The tiles leave the bias out: it joins the sums as they come back from `pre`. Each
        // panel's product first asks for the lines of xproj (and saved gates) that the update
        // after the product will touch for its units: the tiles do not wait on them, and
        // otherwise the update waited on each (DRAM: xproj was written long before).
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
            cell_prefetch(pan, 0, static_cast<int>(rows));
            amx_panel_product<NV>(hbf[s & 1], amx_ld, rows,
                                  amx_pack + pan * amx_panel_elems(NV, P), amx_chunks(P),
                                  pre + pan * NV * W, pre_ld);
          }
        }
      } else {
        PanelGemm<T, NV>::run(h_prev, ld, rows, P, w_pack, bias_pack, pan_begin, pan_end,
                              scratch, park, [](int64_t, int64_t, int) {}, (s & 1) != 0);
      }
      const T* amx_bias = lay.amx ? bias_pack : nullptr;
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
          V sums[1][NV];
          for (int v = 0; v < NV; ++v) {
            sums[0][v] = V::load(pre + b * pre_ld + (pan * NV + v) * W);
            if (amx_bias) sums[0][v] += V::load(amx_bias + (pan * NV + v) * W);
          }
          cell_epilogue(pan, b, 1, sums);
        }
      }
    } else {
      PanelGemm<T, NV>::run(h_prev, ld, rows, P, w_pack, bias_pack, pan_begin, pan_end, scratch,
                            cell_epilogue, cell_prefetch, (s & 1) != 0);
    }

    // Padded rows: the state stays, the output row is zero.
    if (p.lengths) {
      for (int64_t b = 0; b < B; ++b) {
        if (steps.active(b, s)) continue;
        if (!projected) keep_h(b, unit_begin, unit_end);
      }
    }

    if (projected) {
      team.sync();  // r_t complete
      auto proj_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
        for (int i = 0; i < m; ++i) {
          const int64_t b = r0 + i;
          if (!steps.active(b, s)) continue;
          S* out = row_of<S>(p.out, steps.time(b, s), b);
          for (int v = 0; v < kColVecs; ++v) {
            const int64_t col = (pan * kColVecs + v) * W;
            if (col >= P) break;
            const int n = static_cast<int>(imin(W, P - col));
            publish_h(b, col, acc[i][v], n);
            store_as(out + col, acc[i][v], n);
          }
        }
      };
      if (lay.proj_in_place) {
        InPlaceDots<T>::template run<kColVecs, kColVecs>(
            rbuf, ld, rows, H, w_hr, static_cast<const S*>(nullptr), P, ppan_begin, ppan_end,
            proj_epilogue,
            [](int64_t, int64_t, int) {}, false);
      } else {
        PanelGemm<T, kColVecs>::run(rbuf, ld, rows, H, wr_pack, nullptr, ppan_begin, ppan_end,
                                    proj_scratch, proj_epilogue);
      }
      if (p.lengths) {
        for (int64_t b = 0; b < B; ++b) {
          if (steps.active(b, s)) continue;
          keep_h(b, col_begin, col_end);
        }
      }
    }
    team.sync();  // h_t complete
  }

  // Final states: each thread copies what it owns.
  const T* h_last = hbuf[seq_len & 1];
  const int64_t own_begin = projected ? col_begin : unit_begin;
  const int64_t own_end = projected ? col_end : unit_end;
  for (int64_t b = 0; b < B; ++b) {
    convert_row(static_cast<S*>(p.hn) + b * P + own_begin, h_last + b * ld + own_begin,
                own_end - own_begin);
    if constexpr (C == CellKind::kLstm) {
      convert_row(static_cast<S*>(p.cn) + b * H + unit_begin, cbuf + b * ld + unit_begin,
                  unit_end - unit_begin);
    }
  }
}

// ------------------------------------------------------------------------------ backward
// T, S: as forward_impl's (the carried d_h, d_c and d_pre stay in T).
template <typename T, CellKind C, typename S>
void backward_impl(const RecurrenceBwdParams& p, const Team& team) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using L = BwdLayout<T, C>;
  using V = Vec<T, W>;
  const L lay(p);
  const int64_t seq_len = p.seq_len, B = p.batch, H = p.hidden, P = p.state, ld = lay.ld;
  const int64_t ldg = lay.ldg;
  const bool projected = C == CellKind::kLstm && P != H;
  const Steps steps{p.lengths, seq_len, p.reverse};
  const int64_t cpp = lay.cols_per_panel;

  char* ws = aligned_base(p.workspace);
  T* wt_pack = reinterpret_cast<T*>(ws + lay.wt_pack);
  T* wr_pack = reinterpret_cast<T*>(ws + lay.wr_pack);
  T* dh_state = reinterpret_cast<T*>(ws + lay.dh);
  T* dc_state = reinterpret_cast<T*>(ws + lay.dc);
  // The product's d_pre in float (null with the tiles, which read dpbf_buf instead).
  T* dpre_buf[2] = {nullptr, nullptr};
  if (!lay.amx) {
    dpre_buf[0] = reinterpret_cast<T*>(ws + lay.dpre);
    dpre_buf[1] = dpre_buf[0] + B * ldg;
  }
  // The AMX product's bfloat16 copies of d_pre (BwdLayout::amx; null otherwise), amx_ld apart,
  // and its sums.
  const int64_t amx_ld = amx_lda(G * H), amx_row_count = amx_rows(B);
  BFloat16* dpbf_buf[2] = {nullptr, nullptr};
  if (lay.amx) {
    dpbf_buf[0] = reinterpret_cast<BFloat16*>(ws + lay.dpbf);
    dpbf_buf[1] = dpbf_buf[0] + amx_row_count * amx_ld;
  }
  BFloat16* amx_pack = reinterpret_cast<BFloat16*>(ws + lay.amx_pack);
  T* amx_sums = reinterpret_cast<T*>(ws + lay.amx_sums);
  T* dh_direct = reinterpret_cast<T*>(ws + lay.dh_direct);
  T* dht = reinterpret_cast<T*>(ws + lay.dht);
  T* scratch = reinterpret_cast<T*>(ws + lay.scratch);
  T* proj_scratch = reinterpret_cast<T*>(ws + lay.proj_scratch);
  const S* w_hh = static_cast<const S*>(p.w_hh);
  const S* w_hr = static_cast<const S*>(p.w_hr);

  // Panels over state columns (the product d_pre W_hh); without projection also the units of
  // the pointwise part. Projected: units come from the panels over H of the d_h W_hr product.
  int64_t pan_begin, pan_end, upan_begin = 0, upan_end = 0;
  split_range(lay.panels, team.rank, team.size, pan_begin, pan_end);
  const int64_t col_begin = imin(pan_begin * cpp, P), col_end = imin(pan_end * cpp, P);
  int64_t unit_begin = col_begin, unit_end = col_end;
  if (projected) {
    split_range(lay.proj_panels, team.rank, team.size, upan_begin, upan_end);
    unit_begin = imin(upan_begin * cpp, H);
    unit_end = imin(upan_end * cpp, H);
  }

  // As in the forward: this thread's panels, and its AMX tiles while it runs.
  AmxTileScope tiles(lay.amx);
  if (lay.amx) {
    if constexpr (std::is_same_v<S, BFloat16>) {
      for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
        pack_amx_panel_by_rows<kColVecs>(amx_pack + pan * amx_panel_elems(kColVecs, G * H), w_hh,
                                         P, G * H, pan * cpp, imin(cpp, P - pan * cpp));
      }
    }
  } else {
    pack_panels<T, kColVecs>(wt_pack, w_hh, G * H, 1, P, pan_begin, pan_end,
                             [&](int64_t pan, int v, int w) -> int64_t {
                               const int64_t col = (pan * kColVecs + v) * W + w;
                               return col < P ? col : -1;
                             });
  }
  if (projected) {
    pack_panels<T, kColVecs>(wr_pack, w_hr, P, 1, H, upan_begin, upan_end,
                             [&](int64_t pan, int v, int w) -> int64_t {
                               const int64_t col = (pan * kColVecs + v) * W + w;
                               return col < H ? col : -1;
                             });
  }
  if (team.rank == 0) {
    std::memset(dh_state, 0, sizeof(T) * B * ld);
    if (p.d_hn) {
      for (int64_t b = 0; b < B; ++b) {
        convert_row(dh_state + b * ld, static_cast<const S*>(p.d_hn) + b * P, P);
      }
    }
    if constexpr (C == CellKind::kLstm) {
      std::memset(dc_state, 0, sizeof(T) * B * ld);
      if (p.d_cn) {
        for (int64_t b = 0; b < B; ++b) {
          convert_row(dc_state + b * ld, static_cast<const S*>(p.d_cn) + b * H, H);
        }
      }
    }
    if constexpr (C == CellKind::kGru) std::memset(dh_direct, 0, sizeof(T) * B * ld);
    if (lay.amx) {  // padding k and rows: zeros, as in the forward's hbf
      std::memset(static_cast<void*>(dpbf_buf[0]), 0,
                  sizeof(BFloat16) * 2 * amx_row_count * amx_ld);
    } else {
      std::memset(dpre_buf[0], 0, sizeof(T) * 2 * B * ldg);
    }
  }
  team.sync();

  // The cell backward for row b at step s, units [u, u + n): d is the gradient w.r.t. h_t
  // (w.r.t. r_t = o tanh(c_t) for a projected LSTM). Writes d_pre (for the product), d_xproj,
  // d_hproj and the carried states.
  BFloat16* dpbf = nullptr;  // this step's bfloat16 d_pre (BwdLayout::amx), else null
  // d_pre of gate g, units [u, u + n) of row b, for the product: into this step's float dpre,
  // or into its bfloat16 copy where the tiles read that instead.
  auto publish_dpre = [&](T* dpre, int64_t b, int g, int64_t u, const V& x, int n) {
    if constexpr (std::is_same_v<T, float>) {
      if (dpbf) {
        store_as(dpbf + b * amx_ld + g * H + u, x, n);
        return;
      }
    }
    x.store_partial(dpre + b * ldg + g * H + u, n);
  };
  auto cell_backward = [&](int64_t b, int64_t s, int64_t u, int n, V d, T* dpre) {
    const int64_t t = steps.time(b, s);
    S* dx = row_of<S>(p.d_xproj, t, b);
    S* dhp = p.d_hproj.data ? row_of<S>(p.d_hproj, t, b) : nullptr;
    if constexpr (C == CellKind::kLstm) {
      const auto gate = load_saved_lstm_gates<V>(row_of<const S>(p.gates, t, b), H, u, n);
      const V c = load_as<V>(row_of<const S>(p.c_seq, t, b) + u, n);
      V c_prev = V::zero();
      if (s > 0) {
        c_prev = load_as<V>(row_of<const S>(p.c_seq, steps.prev_time(b, s), b) + u, n);
      } else if (p.c0) {
        c_prev = load_as<V>(static_cast<const S*>(p.c0) + b * H + u, n);
      }
      const auto grad = lstm_backward(gate, c, c_prev, d, V::load(dc_state + b * ld + u));
      grad.d_c_prev.store(dc_state + b * ld + u);
      const V parts[4] = {grad.d_i, grad.d_f, grad.d_g, grad.d_o};
      for (int g = 0; g < 4; ++g) {
        store_as(dx + g * H + u, parts[g], n);
        publish_dpre(dpre, b, g, u, parts[g], n);
        if (dhp) store_as(dhp + g * H + u, parts[g], n);
      }
    } else if constexpr (C == CellKind::kGru) {
      const auto gate = load_saved_gru_gates<V>(row_of<const S>(p.gates, t, b), H, u, n);
      V h_prev = V::zero();
      if (s > 0) {
        h_prev = load_as<V>(row_of<const S>(p.out, steps.prev_time(b, s), b) + u, n);
      } else if (p.h0) {
        h_prev = load_as<V>(static_cast<const S*>(p.h0) + b * P + u, n);
      }
      const auto grad = gru_backward(gate, h_prev, d);
      grad.d_h_prev_direct.store(dh_direct + b * ld + u);
      const V dxs[3] = {grad.dx_r, grad.dx_z, grad.dx_n};
      const V dhs[3] = {grad.dh_r, grad.dh_z, grad.dh_n};
      for (int g = 0; g < 3; ++g) {
        store_as(dx + g * H + u, dxs[g], n);
        store_as(dhp + g * H + u, dhs[g], n);
        publish_dpre(dpre, b, g, u, dhs[g], n);
      }
    } else {
      const V h_next = load_as<V>(row_of<const S>(p.out, t, b) + u, n);
      V pre;
      for (int w = 0; w < W; ++w) {
        pre.v[w] = rnn_backward(p.cell, Vec<T, 1>(h_next.v[w]), Vec<T, 1>(d.v[w])).v;
      }
      store_as(dx + u, pre, n);
      publish_dpre(dpre, b, 0, u, pre, n);
      if (dhp) store_as(dhp + u, pre, n);
    }
  };

  // Zero gradient rows of padded steps, for this thread's units (and columns).
  auto zero_padded = [&](int64_t b, int64_t s) {
    for (int g = 0; g < G; ++g) {
      zero_row(row_of<S>(p.d_xproj, s, b) + g * H + unit_begin, unit_end - unit_begin);
      if (p.d_hproj.data) {
        zero_row(row_of<S>(p.d_hproj, s, b) + g * H + unit_begin, unit_end - unit_begin);
      }
    }
  };

  for (int64_t s = seq_len - 1; s >= 0; --s) {
    T* dpre = dpre_buf[s & 1];
    dpbf = dpbf_buf[s & 1];
    const int64_t rows = steps.rows_needed(s, B);
    if (!projected) {
      for (int64_t b = 0; b < B; ++b) {
        if (!steps.active(b, s)) {
          zero_padded(b, s);
          continue;
        }
        const S* d_out = p.d_out.data ? row_of<const S>(p.d_out, steps.time(b, s), b) : nullptr;
        for (int64_t u = unit_begin; u < unit_end; u += W) {
          const int n = static_cast<int>(imin(W, unit_end - u));
          V d = V::load(dh_state + b * ld + u);
          if (d_out) d += load_as<V>(d_out + u, n);
          cell_backward(b, s, u, n, d, dpre);
        }
      }
    } else {
      // d_h_t = carried + d_out, over this thread's state columns.
      for (int64_t b = 0; b < B; ++b) {
        if (!steps.active(b, s)) {
          zero_row(row_of<S>(p.d_h_seq, s, b) + col_begin, col_end - col_begin);
          continue;
        }
        const int64_t t = steps.time(b, s);
        const S* d_out = p.d_out.data ? row_of<const S>(p.d_out, t, b) : nullptr;
        S* dhs = row_of<S>(p.d_h_seq, t, b);
        for (int64_t c = col_begin; c < col_end; c += W) {
          const int n = static_cast<int>(imin(W, col_end - c));
          V d = V::load(dh_state + b * ld + c);
          if (d_out) d += load_as<V>(d_out + c, n);
          d.store(dht + b * ld + c);
          store_as(dhs + c, d, n);
        }
      }
      team.sync();  // d_h_t complete
      auto proj_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
        for (int i = 0; i < m; ++i) {
          const int64_t b = r0 + i;
          if (!steps.active(b, s)) continue;
          for (int v = 0; v < kColVecs; ++v) {
            const int64_t u = (pan * kColVecs + v) * W;
            if (u >= H) break;
            cell_backward(b, s, u, static_cast<int>(imin(W, H - u)), acc[i][v], dpre);
          }
        }
      };
      PanelGemm<T, kColVecs>::run(dht, ld, rows, P, wr_pack, nullptr, upan_begin, upan_end,
                                  proj_scratch, proj_epilogue);
      for (int64_t b = 0; b < B; ++b) {
        if (!steps.active(b, s)) zero_padded(b, s);
      }
    }
    team.sync();  // d_pre complete

    // d_h_{t-1} = d_pre W_hh (+ the direct part of a GRU), for the rows active at s.
    auto carry_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
      for (int i = 0; i < m; ++i) {
        const int64_t b = r0 + i;
        if (!steps.active(b, s)) continue;
        for (int v = 0; v < kColVecs; ++v) {
          const int64_t col = (pan * kColVecs + v) * W;
          if (col >= P) break;
          V d = acc[i][v];
          if constexpr (C == CellKind::kGru) d += V::load(dh_direct + b * ld + col);
          d.store(dh_state + b * ld + col);
        }
      }
    };
    if (lay.amx) {
      if constexpr (std::is_same_v<T, float>) {
        const int64_t sums_ld = lay.amx_sums_ld;
        for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
          amx_panel_product<kColVecs>(dpbf, amx_ld, rows,
                                      amx_pack + pan * amx_panel_elems(kColVecs, G * H),
                                      amx_chunks(G * H), amx_sums + pan * cpp, sums_ld);
          for (int64_t b = 0; b < rows; ++b) {
            V sums[1][kColVecs];
            for (int v = 0; v < kColVecs; ++v) {
              sums[0][v] = V::load(amx_sums + b * sums_ld + pan * cpp + v * W);
            }
            carry_epilogue(pan, b, 1, sums);
          }
        }
      }
    } else {
      PanelGemm<T, kColVecs>::run(dpre, ldg, rows, G * H, wt_pack, nullptr, pan_begin, pan_end,
                                  scratch, carry_epilogue);
    }
  }

  for (int64_t b = 0; b < B; ++b) {
    convert_row(static_cast<S*>(p.d_h0) + b * P + col_begin, dh_state + b * ld + col_begin,
                col_end - col_begin);
    if constexpr (C == CellKind::kLstm) {
      if (p.d_c0) {
        convert_row(static_cast<S*>(p.d_c0) + b * H + unit_begin, dc_state + b * ld + unit_begin,
                    unit_end - unit_begin);
      }
    }
  }
}

// ------------------------------------------------------------------------------ entry points
// Fn<T, C, S>::call for the params' cell and dtype: T the compute type, S the storage type
// (storage.h).
template <template <typename, CellKind, typename> class Fn, typename Params, typename... Args>
auto dispatch_cell_dtype(const Params& p, Args&&... args) {
  auto with_cell = [&](auto compute, auto storage) {
    using T = decltype(compute);
    using S = decltype(storage);
    switch (p.cell) {
      case CellKind::kLstm:
        return Fn<T, CellKind::kLstm, S>::call(p, args...);
      case CellKind::kGru:
        return Fn<T, CellKind::kGru, S>::call(p, args...);
      default:  // tanh and relu share the code; the cell picks the nonlinearity at run time
        return Fn<T, CellKind::kRnnTanh, S>::call(p, args...);
    }
  };
  if (p.dtype == DType::kFloat64) return with_cell(double{}, double{});
  if (p.dtype == DType::kBFloat16) return with_cell(float{}, BFloat16{});
  return with_cell(float{}, float{});
}

template <typename T, CellKind C, typename S>
struct FwdBytes {
  static int64_t call(const RecurrenceFwdParams& p) { return FwdLayout<T, C>(p).bytes; }
};
template <typename T, CellKind C, typename S>
struct BwdBytes {
  static int64_t call(const RecurrenceBwdParams& p) { return BwdLayout<T, C>(p).bytes; }
};
template <typename T, CellKind C, typename S>
struct FwdThreads {
  static int call(const RecurrenceFwdParams& p) {
    return static_cast<int>(FwdLayout<T, C>(p).panels);
  }
};
template <typename T, CellKind C, typename S>
struct BwdThreads {
  static int call(const RecurrenceBwdParams& p) {
    return static_cast<int>(BwdLayout<T, C>(p).panels);
  }
};
template <typename T, CellKind C, typename S>
struct FwdRun {
  static int call(const RecurrenceFwdParams& p, const Team& team) {
    forward_impl<T, C, S>(p, team);
    return 0;
  }
};
template <typename T, CellKind C, typename S>
struct BwdRun {
  static int call(const RecurrenceBwdParams& p, const Team& team) {
    backward_impl<T, C, S>(p, team);
    return 0;
  }
};

int64_t forward_workspace_bytes(const RecurrenceFwdParams& p) {
  return dispatch_cell_dtype<FwdBytes>(p);
}
int64_t backward_workspace_bytes(const RecurrenceBwdParams& p) {
  return dispatch_cell_dtype<BwdBytes>(p);
}
int forward_max_threads(const RecurrenceFwdParams& p) {
  return dispatch_cell_dtype<FwdThreads>(p);
}
int backward_max_threads(const RecurrenceBwdParams& p) {
  return dispatch_cell_dtype<BwdThreads>(p);
}
void forward_direction(const RecurrenceFwdParams& p, const Team& team) {
  dispatch_cell_dtype<FwdRun>(p, team);
}
void backward_direction(const RecurrenceBwdParams& p, const Team& team) {
  dispatch_cell_dtype<BwdRun>(p, team);
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
