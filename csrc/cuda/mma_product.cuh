// The tensor-core version of the per-step product (block_product.cuh): out[b][r] =
// sum_k act[b][k] * w[r][k] for 16-bit operands with both the weight rows and the activation chunk
// in shared memory, fp32 accumulation. Each warp computes the 16 x 8 output tiles of its items
// (make_mma_tiling) with mma.sync.m16n8k16 and stores them as partial sums in the layout that
// product_value reads, so the kernels do not know which product ran.
//
// Both operands are rows with K contiguous, which is what .row.col wants of A (M x K, row-major)
// and of B (K x N, column-major, i.e. N rows of K), so ldmatrix without .trans loads either; the
// tiling picks which one is the M side. K is read in steps of 16 up to K rounded up to 16: the
// kernel zero-fills shared memory once at the start (zero_shared_memory), so the padding columns
// of the weight rows are zero, and load_act_chunk zeroes those of the activation rows it loads.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dtype_traits.cuh"
#include "launch_compat.h"
#include "mma.cuh"
#include "recurrence_layout.h"

namespace fusedrnn::cuda {

template <typename T>
inline constexpr bool kIs16BitFloat =
    std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    fusedrnn::mma_m16n8k16_bf16(d, a, b, d);
  } else {
    fusedrnn::mma_m16n8k16_f16(d, a, b, d);
  }
}

// One K step of 16: the M operand's 16 x 16 fragment and the N operand's 16 x 8 (ldmatrix x4 and
// x2 from this lane's row addresses, set up by the caller), one MMA into acc.
template <typename T>
__device__ __forceinline__ void mma_k_step(float (&acc)[4], const T* m_row, const T* n_row, int k) {
  uint32_t a[4];
  uint32_t b[2];
  fusedrnn::ldmatrix_x4(a, m_row + k);
  fusedrnn::ldmatrix_x2(b, n_row + k);
  mma_16x8x16<T>(acc, a, b);
}

// The MMAs of the K steps [k_begin, k_end) (multiples of 16) of one output tile, k_step(acc, k)
// each, into kMmaChains accumulators in turn (consecutive MMAs into one accumulator wait for each
// other's result; a warp's K range is often its block's only MMA work, one warp per SM
// sub-partition, so nothing else hides that latency); returns their sum in `sum` (the D fragment).
constexpr int kMmaChains = 4;

template <typename KStep>
__device__ __forceinline__ void mma_k_range(int k_begin, int k_end, KStep k_step, float (&sum)[4]) {
  float acc[kMmaChains][4] = {};
  int k = k_begin;
  for (; k + (kMmaChains - 1) * kMmaK < k_end; k += kMmaChains * kMmaK) {
#pragma unroll
    for (int c = 0; c < kMmaChains; ++c) k_step(acc[c], k + c * kMmaK);
  }
#pragma unroll
  for (int c = 0; c < kMmaChains - 1; ++c) {
    if (k < k_end) k_step(acc[c], k);
    k += kMmaK;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float total = 0.f;
#pragma unroll
    for (int c = 0; c < kMmaChains; ++c) total += acc[c][i];
    sum[i] = total;
  }
}

// Stores a tile's D fragment (d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]; M x N = 16 x 8)
// into its partial sums, row-in-tile major: value (r, b) of the tile at (r << tile_batch_log2) + b,
// where batch-major tiles have the batch rows as M. accumulate: add to what is there.
__device__ __forceinline__ void store_tile_partials(float* dst, const float (&d)[4],
                                                    bool batch_major, bool accumulate) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane >> 2;
  const int t2 = (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >= 2 ? 8 : 0);
    const int n = t2 + (i & 1);
    const int at = batch_major ? (n << 4) + m : (m << 3) + n;
    dst[at] = accumulate ? dst[at] + d[i] : d[i];
  }
}

// w: the block's weight rows in shared memory, row r at w + (r - row_begin) * w_pitch; act: the
// chunk's batch rows, row b at act + b * act_pitch. Rows and batch rows beyond the valid ones are
// clamped to the last valid one (their outputs are never read). All 32 lanes of a warp take part
// in every MMA. [row_begin, row_end): the rows present at w (a staging pass, at multiples of 16
// rows, so that no tile straddles two passes); only their tiles are computed.
template <typename T>
__device__ __forceinline__ void mma_product_partials(const T* w, int64_t w_pitch, int rows,
                                                     const T* act, int64_t act_pitch, int batch,
                                                     int k_total, float* partials,
                                                     const ProductTiling& tiling,
                                                     int row_begin = 0, int row_end = 1 << 30) {
  static_assert(kIs16BitFloat<T>, "tensor-core product: fp16 and bf16 operands only");
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int warps = static_cast<int>(blockDim.x) / 32;
  const bool batch_major = tiling.tile_batch_log2 == 4;
  const int k_padded = static_cast<int>(round_up(k_total, kMmaK));
  // The window's tile rows; its items are numbered like the whole product's (k_part major).
  const int tile_row_begin = row_begin >> tiling.tile_rows_log2;
  const int tile_row_end =
      min(tiling.tiles_rows, static_cast<int>(ceil_div(min(row_end, rows), 1 << tiling.tile_rows_log2)));
  const int window_rows = max(tile_row_end - tile_row_begin, 0);
  const int window_tiles = window_rows * tiling.tiles_batch;
  const int items = window_tiles * tiling.split;
  for (int j = warp; j < items; j += warps) {
    const int k_part = j / window_tiles;
    const int local = j - k_part * window_tiles;
    const int tile_row = tile_row_begin + local % window_rows;
    const int tile_batch = local / window_rows;
    const int tile = tile_row + tile_batch * tiling.tiles_rows;
    const int item = k_part * tiling.tiles + tile;
    const int r0 = tile_row << tiling.tile_rows_log2;
    const int b0 = tile_batch << tiling.tile_batch_log2;
    // ldmatrix row addresses. x4 (M side): lanes 0-15 give rows 0-15 at k, lanes 16-31 the same
    // rows at k + 8. x2 (N side): lanes 0-7 rows 0-7 at k, lanes 8-15 at k + 8 (lanes 16-31
    // repeat them; their addresses are unused).
    const int m_index = lane % 16;
    const int m_k = (lane / 16) * 8;
    const int n_index = lane % 8;
    const int n_k = ((lane / 8) % 2) * 8;
    const T* m_row;
    const T* n_row;
    if (batch_major) {
      m_row = act + min(b0 + m_index, batch - 1) * act_pitch + m_k;
      n_row = w + (min(r0 + n_index, rows - 1) - row_begin) * w_pitch + n_k;
    } else {
      m_row = w + (min(r0 + m_index, rows - 1) - row_begin) * w_pitch + m_k;
      n_row = act + min(b0 + n_index, batch - 1) * act_pitch + n_k;
    }
    const int k_begin = k_part * tiling.k_chunk;
    float d[4];
    mma_k_range(k_begin, min(k_padded, k_begin + tiling.k_chunk),
                [&](float(&acc)[4], int k) { mma_k_step<T>(acc, m_row, n_row, k); }, d);
    store_tile_partials(partials + static_cast<int64_t>(item) * tiling.tile_size(), d, batch_major,
                        false);
  }
}

// Zeroes `bytes` of shared memory (16-byte aligned, a multiple of 16), 16 bytes per store.
__device__ __forceinline__ void zero_shared_memory(unsigned char* smem, int64_t bytes) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) {
    reinterpret_cast<uint4*>(smem)[i] = zero;
  }
}

}  // namespace fusedrnn::cuda
