// The persistent forward recurrence kernel, one template for every cell (Cell traits), dtype and
// weight placement (kWeightsInSmem: the block's W_hh / W_hr rows copied once into shared memory;
// otherwise streamed from global memory / L2 at every step, for slices too large for the chip).
//
// One launch runs a layer over the whole sequence, both directions at once. Per step s:
//   phase 0: act = h_{s-1} (all B x P, from the exchange buffer or h0), product with the block's
//            G*U gate rows, then the cell update of the block's units (block-local: all gates of
//            a unit live in the block), writing out/gates/c_seq and h_s into the other exchange
//            buffer. One grid barrier; or, with the tagged exchange (tagged_exchange.cuh), h_s
//            goes out as tagged words that the next step polls for, and no barrier.
//   phase 1 (projected LSTM only): the r_s of phase 0 went to the r exchange buffer; after the
//            barrier act = r_s (B x H), product with the block's rows of W_hr gives h_s for the
//            block's state columns. A second grid barrier.
// Batch rows are processed in chunks of geo.batch_chunk when B x K does not fit next to the weights.
#pragma once

#include "block_product.cuh"
#include "cell_traits.cuh"
#include "dtype_traits.cuh"
#include "recurrence_common.cuh"
#include "tagged_exchange.cuh"

namespace fusedrnn::cuda {

// The G input-projection values of (batch row b, unit) at processing step s, as stored (V = T) or
// converted (V = Acc<T>); nothing for a padded step (its values are never used). Kept as stored
// when loaded early: converting them at once would wait for the load right there.
template <int G, typename T, typename V>
__device__ __forceinline__ void load_step_inputs(const RecurrenceFwdParams& p, int s, int b,
                                                 int unit, V (&x)[G]) {
  const StepRow row = step_row(p, s, b);
  if (!row.valid) return;
  const T* x_row = seq_at<const T>(p.xproj, row.t, b);
  const int64_t H = p.hidden;
#pragma unroll
  for (int g = 0; g < G; ++g) x[g] = stored_as<V>(x_row[g * H + unit]);
}

template <class Cell, typename T, bool kWeightsInSmem>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, 1)
    recurrence_forward_kernel(const __grid_constant__ FwdKernelArgs args) {
  using A = Acc<T>;
  constexpr int G = Cell::kGates;
  const RecurrenceGeometry& geo = args.geo;
  const int dir = static_cast<int>(blockIdx.x) / geo.blocks_per_dir;
  const int blk = static_cast<int>(blockIdx.x) - dir * geo.blocks_per_dir;
  const RecurrenceFwdParams& p = args.dir[dir];
  const int H = static_cast<int>(p.hidden);
  const int P = static_cast<int>(p.state);
  const int B = static_cast<int>(p.batch);
  const int steps = static_cast<int>(p.seq_len);
  const bool projected = geo.projected;
  // This block's hidden units [u0, u0 + nu) and (projected) state columns [c0, c0 + nc).
  const int u0 = blk * geo.units_per_block;
  const int nu = max(0, min(H - u0, geo.units_per_block));
  const int c0 = blk * geo.cols_per_block;
  const int nc = projected ? max(0, min(P - c0, geo.cols_per_block)) : 0;

  unsigned char* ws = static_cast<unsigned char*>(args.dir[0].workspace) +
                      static_cast<int64_t>(dir) * args.workspace.per_direction;
  T* h_exchange = reinterpret_cast<T*>(ws + args.workspace.offset[0]);  // 2 x [B, P]
  // The same region as tagged words (geo.tagged_exchange): 2 x [B, row_words].
  uint64_t* h_words = reinterpret_cast<uint64_t*>(ws + args.workspace.offset[0]);
  T* r_exchange = reinterpret_cast<T*>(ws + args.workspace.offset[1]);  // [B, H]
  A* cell_state = reinterpret_cast<A*>(ws + args.workspace.offset[2]);  // [B, H]

  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* w_hr = static_cast<const T*>(p.w_hr);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  const T* h0 = static_cast<const T*>(p.h0);
  const T* c_init = static_cast<const T*>(p.c0);

  FUSEDRNN_DYNAMIC_SMEM(smem);
  T* act = smem_at<T>(smem, geo.smem_act);
  T* stage = smem_at<T>(smem, geo.smem_weights[0]);  // staged streaming's pass buffer
  T* h_stage = smem_at<T>(smem, geo.smem_h_stage);    // the tagged exchange's slice of h_s
  A* partials = smem_at<A>(smem, geo.smem_partials);
  const int64_t act_pitch = geo.act_pitch;

  // Weight rows: phase 0 row g*nu + u is W_hh row g*H + u0 + u; phase 1 row c is W_hr row c0 + c.
  WeightView<T> gate_rows;
  WeightView<T> proj_rows;
  zero_padding_for_tensor_cores<kWeightsInSmem, T>(smem, geo.smem_bytes);
  if constexpr (kWeightsInSmem) {
    T* w0 = smem_at<T>(smem, geo.smem_weights[0]);
    T* w1 = smem_at<T>(smem, geo.smem_weights[1]);
    const int64_t pitch0 = geo.weight_pitch[0];
    const int64_t pitch1 = geo.weight_pitch[1];
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(G) * nu * P; i += blockDim.x) {
      const int64_t r = i / P;
      const int64_t k = i - r * P;
      const int64_t g = r / nu;
      w0[r * pitch0 + k] = w_hh[(g * H + u0 + (r - g * nu)) * P + k];
    }
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nc) * H; i += blockDim.x) {
      const int64_t r = i / H;
      w1[r * pitch1 + (i - r * H)] = w_hr[(c0 + r) * H + (i - r * H)];
    }
    gate_rows = WeightView<T>{w0, max(nu, 1), nu * pitch0, pitch0, 1};
    proj_rows = WeightView<T>{w1, max(nc, 1), 0, pitch1, 1};
    __syncthreads();
  } else {
    gate_rows = WeightView<T>{w_hh + static_cast<int64_t>(u0) * P, max(nu, 1),
                              static_cast<int64_t>(H) * P, P, 1};
    proj_rows = WeightView<T>{projected ? w_hr + static_cast<int64_t>(c0) * H : w_hr, max(nc, 1),
                              0, H, 1};
  }

  // When each (batch row, unit) of the block has a thread of its own for the whole sequence (one
  // batch chunk, B * nu <= threads), that thread
  // - loads its xproj values early, so that their trip to memory (xproj is T x B x G*H, far larger
  //   than L2 at the anchor's 100 MB) overlaps other work: at the start of step s, under the
  //   activation load and the product; with geo.inputs_ahead, right after step s-1's cell update,
  //   under the exchange as well (see ItemThreads);
  // - keeps its b_hh values and its LSTM cell state in registers: the grid barrier empties L1, so
  //   every global read in the cell update is an L2 round trip on the step's critical path.
  const bool own_item = geo.batch_chunk >= B && B * nu <= static_cast<int>(blockDim.x);
  const ItemThreads items(own_item, B * nu);
  const bool has_item = items.has_item();
  const bool ahead = geo.inputs_ahead;
  T x_early[G];
  A bias_own[G];
  A c_own = A(0);
  if (has_item) {
    const int unit = u0 + items.item % nu;
#pragma unroll
    for (int g = 0; g < G; ++g) bias_own[g] = b_hh != nullptr ? to_acc(b_hh[g * H + unit]) : A(0);
    if constexpr (Cell::kHasCell) {
      const int64_t at = static_cast<int64_t>(items.item / nu) * H + unit;
      c_own = c_init != nullptr ? to_acc(c_init[at]) : A(0);
    }
    if (ahead) load_step_inputs<G, T>(p, 0, items.item / nu, unit, x_early);
  }

  constexpr bool kCanTag = sizeof(T) <= 4;
  const bool tagged = kCanTag && geo.tagged_exchange;
  const int64_t row_words = ceil_div(P, kValuesPerWord<T>);
  if constexpr (kCanTag) {
    if (tagged) {
      clear_tagged_words<T>(h_words, row_words, B, u0, nu);
      direction_barrier(geo.blocks_per_dir);  // every block's words cleared before any poll
    }
  }

  // Staged products run so far on phase 0's weights (PassOrder); a projected LSTM's phases share
  // the stage, so theirs do not keep it.
  int stage_calls = 0;

  for (int s = 0; s < steps; ++s) {
    // h_{s-1}: h0 (null = zeros) at the first step, else the exchange buffer written last step.
    const T* h_src = s == 0 ? h0 : h_exchange + static_cast<int64_t>(s & 1) * B * P;
    T* h_dst = h_exchange + static_cast<int64_t>((s + 1) & 1) * B * P;

    if (has_item && !ahead) {
      load_step_inputs<G, T>(p, s, items.item / nu, u0 + items.item % nu, x_early);  // see own_item
    }

    // ---- phase 0: gates and cell update of the block's units
    for (int b0 = 0; b0 < B; b0 += geo.batch_chunk) {
      const int nb = min(geo.batch_chunk, B - b0);
      if (tagged && s > 0) {
        if constexpr (kCanTag) {
          load_tagged_chunk(act, act_pitch,
                            h_words + (static_cast<int64_t>(s & 1) * B + b0) * row_words,
                            row_words, nb, P, static_cast<uint32_t>(s));
        }
      } else {
        load_act_chunk(act, act_pitch,
                       h_src != nullptr ? h_src + static_cast<int64_t>(b0) * P : nullptr, P, nb, P);
      }
      __syncthreads();
      const ProductTiling tiling =
          product_tiling<kWeightsInSmem, T>(G * nu, nb, P, geo.stage_rows[0]);
      phase_product_partials<true, kWeightsInSmem>(gate_rows, G * nu, stage, geo.weight_pitch[0],
                                                   geo.stage_rows[0], act, act_pitch, nb, P,
                                                   partials, tiling, projected ? -1 : stage_calls++);
      __syncthreads();
      for (int i = items.first; i < nb * nu; i += blockDim.x) {
        const int bl = i / nu;
        const int u = i - bl * nu;
        const int b = b0 + bl;
        const int unit = u0 + u;
        const StepRow row = step_row(p, s, b);
        if (!row.valid) {
          // Padded: the state stays; without projection this block also owns the output column.
          if (!projected) {
            seq_at<T>(p.out, row.t, b)[unit] = from_acc<T>(A(0));
            if (tagged) {
              h_stage[bl * nu + u] = act[bl * act_pitch + unit];
            } else {
              h_dst[static_cast<int64_t>(b) * P + unit] = act[bl * act_pitch + unit];
            }
          }
          continue;
        }
        A x[G];
        A hh[G];
        A c_prev = A(0);
        const int64_t at = static_cast<int64_t>(b) * H + unit;
        if (own_item) {  // this thread's item: see own_item
#pragma unroll
          for (int g = 0; g < G; ++g) {
            x[g] = to_acc(x_early[g]);
            hh[g] = product_value(partials, tiling, g * nu + u, bl) + bias_own[g];
          }
          c_prev = c_own;
        } else {
          load_step_inputs<G, T>(p, s, b, unit, x);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            hh[g] = product_value(partials, tiling, g * nu + u, bl) +
                    (b_hh != nullptr ? to_acc(b_hh[g * H + unit]) : A(0));
          }
          if constexpr (Cell::kHasCell) {
            c_prev = s == 0 ? (c_init != nullptr ? to_acc(c_init[at]) : A(0)) : cell_state[at];
          }
        }
        const A h_prev = Cell::kNeedsHPrev ? to_acc(act[bl * act_pitch + unit]) : A(0);
        const UnitForward<A> res = Cell::forward(p.cell, x, hh, h_prev, c_prev,
                                                 load_unit_peephole<T, Cell>(p.peephole, H, unit));
        const T h_val = from_acc<T>(res.h);
        const bool last = s == row.length - 1;
        if constexpr (Cell::kHasCell) {
          if (own_item) {
            c_own = res.c;
          } else {
            cell_state[at] = res.c;
          }
          if (p.c_seq.data != nullptr) seq_at<T>(p.c_seq, row.t, b)[unit] = from_acc<T>(res.c);
          if (last) static_cast<T*>(p.cn)[at] = from_acc<T>(res.c);
        }
        if constexpr (Cell::kSaved > 0) {
          if (p.gates.data != nullptr) {
            T* saved = seq_at<T>(p.gates, row.t, b);
#pragma unroll
            for (int k = 0; k < Cell::kSaved; ++k) saved[k * H + unit] = from_acc<T>(res.saved[k]);
          }
        }
        if (projected) {
          r_exchange[static_cast<int64_t>(b) * H + unit] = h_val;
          if (p.r_seq.data != nullptr) seq_at<T>(p.r_seq, row.t, b)[unit] = h_val;
        } else {
          seq_at<T>(p.out, row.t, b)[unit] = h_val;
          if (tagged) {
            h_stage[bl * nu + u] = h_val;
          } else {
            h_dst[static_cast<int64_t>(b) * P + unit] = h_val;
          }
          if (last) static_cast<T*>(p.hn)[static_cast<int64_t>(b) * P + unit] = h_val;
        }
      }
      if (tagged) {
        // Every unit of the chunk is staged (and every read of act and partials done): send them.
        __syncthreads();
        if constexpr (kCanTag) {
          store_tagged_rows(h_words + static_cast<int64_t>((s + 1) & 1) * B * row_words, row_words,
                            h_stage, b0, nb, u0, nu, static_cast<uint32_t>(s + 1));
        }
      }
      // act and partials are reused by the next chunk; after the last chunk a grid barrier
      // (which includes a block barrier) comes first, or, tagged, the block barrier above (the
      // next chunk's or step's first write to h_stage comes after its own block barrier).
      if (!tagged && b0 + geo.batch_chunk < B) __syncthreads();
    }
    // The next step's inputs, read while the blocks exchange h_s (one chunk: the item's cell
    // update of step s has used x_early).
    if (has_item && ahead && s + 1 < steps) {
      load_step_inputs<G, T>(p, s + 1, items.item / nu, u0 + items.item % nu, x_early);
    }

    // ---- phase 1 (projected LSTM): h_s = r_s W_hr^T for the block's state columns
    if (projected) {
      direction_barrier(geo.blocks_per_dir);  // every unit's r_s is in r_exchange
      for (int b0 = 0; b0 < B; b0 += geo.batch_chunk) {
        const int nb = min(geo.batch_chunk, B - b0);
        load_act_chunk(act, act_pitch, r_exchange + static_cast<int64_t>(b0) * H, H, nb, H);
        __syncthreads();
        const ProductTiling tiling =
            product_tiling<kWeightsInSmem, T>(nc, nb, H, geo.stage_rows[1]);
        phase_product_partials<true, kWeightsInSmem>(proj_rows, nc, stage, geo.weight_pitch[1],
                                                     geo.stage_rows[1], act, act_pitch, nb, H,
                                                     partials, tiling, -1);
        __syncthreads();
        for (int i = threadIdx.x; i < nb * nc; i += blockDim.x) {
          const int bl = i / nc;
          const int c = i - bl * nc;
          const int b = b0 + bl;
          const int col = c0 + c;
          const int64_t at = static_cast<int64_t>(b) * P + col;
          const StepRow row = step_row(p, s, b);
          if (!row.valid) {
            seq_at<T>(p.out, row.t, b)[col] = from_acc<T>(A(0));
            h_dst[at] = h_src != nullptr ? h_src[at] : from_acc<T>(A(0));
            continue;
          }
          const T h_val = from_acc<T>(product_value(partials, tiling, c, bl));
          seq_at<T>(p.out, row.t, b)[col] = h_val;
          h_dst[at] = h_val;
          if (s == row.length - 1) static_cast<T*>(p.hn)[at] = h_val;
        }
        // act and partials are reused by the next chunk; after the last chunk a grid barrier
        // (which includes a block barrier) comes first.
        if (b0 + geo.batch_chunk < B) __syncthreads();
      }
    }
    if (!tagged) direction_barrier(geo.blocks_per_dir);  // h_s complete in h_dst for every block
  }
}

}  // namespace fusedrnn::cuda
