// The small-batch forward product that reads W_hh (and W_hr) where it lies instead of packing
// it, leaving its sums in the register layout of the packed product (panel_gemm.h).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "in_place_dots.h is included by the per-ISA translation units only"
#endif

#include <cstdint>

#include "recurrence_common.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

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

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
