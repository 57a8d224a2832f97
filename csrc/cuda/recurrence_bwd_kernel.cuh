// The persistent backward recurrence kernel (same template scheme as the forward kernel). It walks
// the processing steps backwards, s = T-1 .. 0, carrying dh (gradient w.r.t. the state) and, for an
// LSTM, dc. Each block owns the same hidden units as in forward; its weight slice is transposed:
// dh_{s-1} = dpre_s W_hh needs the block's columns of W_hh for all G*H rows.
//
// Per step s (and once more at s = -1 for d_h0):
//   phase 0: act = dpre_{s+1} (the recurrent-product gradients of all units, B x G*H, from the
//            exchange buffer), product with the block's W_hh columns gives the recurrent part of
//            dh for the block's columns (units, or state columns when projected); rows whose step
//            s+1 was padded take d_hn instead (the state was constant from s+1 on). Add d_out.
//            Without projection the cell backward follows at once and writes dpre_s to the other
//            exchange buffer. One grid barrier.
//   phase 1 (projected LSTM): dh goes to the dh exchange buffer; after a barrier, act = dh
//            (B x P) times the block's columns of W_hr gives d_r for the block's units; then the
//            cell backward. A second barrier.
// With streamed 16-bit weights (no projection), phase 0 is K-staged: K ranges of the block's W_hh
// columns and of act pass through shared memory onto the tensor cores (recurrence_layout.h).
#pragma once

#include "block_product.cuh"
#include "cell_traits.cuh"
#include "dtype_traits.cuh"
#include "recurrence_common.cuh"

namespace fusedrnn::cuda {

// What a unit's backward at valid step s reads from the forward's sequences (and h0 / c0): the
// saved gate values, c_t and c_{t-1}, h_{t-1} and h_t, as each cell needs them. Not d_h / d_c.
// V = T keeps them as stored, for a load issued early (widen converts them when they are used:
// converting at once would wait for the loads right there).
template <class Cell, typename T, typename V = Acc<T>>
__device__ __forceinline__ UnitBackwardInput<V> load_unit_backward_input(
    const RecurrenceBwdParams& p, int s, int b, int unit, const StepRow& row) {
  const V zero = stored_as<V>(from_acc<T>(Acc<T>(0)));
  const int64_t H = p.hidden;
  const int64_t at = static_cast<int64_t>(b) * H + unit;
  UnitBackwardInput<V> in{};
  if constexpr (Cell::kSaved > 0) {
    const T* saved = seq_at<const T>(p.gates, row.t, b);
#pragma unroll
    for (int k = 0; k < Cell::kSaved; ++k) in.saved[k] = stored_as<V>(saved[k * H + unit]);
  }
  // The previous step in processing order (forward's h_{t-1} / c_{t-1}); h0 / c0 at s == 0.
  const int64_t t_prev = s > 0 ? step_row(p, s - 1, b).t : 0;
  if constexpr (Cell::kHasCell) {
    in.c = stored_as<V>(seq_at<const T>(p.c_seq, row.t, b)[unit]);
    const T* c0 = static_cast<const T*>(p.c0);
    in.c_prev = s > 0 ? stored_as<V>(seq_at<const T>(p.c_seq, t_prev, b)[unit])
                      : (c0 != nullptr ? stored_as<V>(c0[at]) : zero);
  }
  if constexpr (Cell::kNeedsHPrev) {
    const T* h0 = static_cast<const T*>(p.h0);
    const int64_t P = p.state;
    const T* h0_row = h0 != nullptr ? h0 + static_cast<int64_t>(b) * P : nullptr;
    in.h_prev = s > 0 ? stored_as<V>(seq_at<const T>(p.out, t_prev, b)[unit])
                      : (h0_row != nullptr ? stored_as<V>(h0_row[unit]) : zero);
  }
  if constexpr (Cell::kNeedsHNext) in.h_next = stored_as<V>(seq_at<const T>(p.out, row.t, b)[unit]);
  return in;
}

// The values load_unit_backward_input<Cell, T, T> kept as stored, converted for the cell math.
template <class Cell, typename T>
__device__ __forceinline__ UnitBackwardInput<Acc<T>> widen(const UnitBackwardInput<T>& raw) {
  UnitBackwardInput<Acc<T>> in{};
#pragma unroll
  for (int k = 0; k < Cell::kSaved; ++k) in.saved[k] = to_acc(raw.saved[k]);
  if constexpr (Cell::kHasCell) {
    in.c = to_acc(raw.c);
    in.c_prev = to_acc(raw.c_prev);
  }
  if constexpr (Cell::kNeedsHPrev) in.h_prev = to_acc(raw.h_prev);
  if constexpr (Cell::kNeedsHNext) in.h_next = to_acc(raw.h_next);
  return in;
}

// The cell backward of one (batch row, unit) at a valid step, with `in` from
// load_unit_backward_input and d_h the total state gradient. Writes d_xproj, d_hproj and the dpre
// exchange row, and updates what is carried to the previous step: the LSTM dc (read here) and the
// GRU direct term (read by the caller), in registers or in the workspace.
template <class Cell, typename T>
__device__ __forceinline__ void unit_backward(const RecurrenceBwdParams& p, int s, int b, int unit,
                                              const StepRow& row, UnitBackwardInput<Acc<T>> in,
                                              Acc<T> d_h, T* d_dst, Acc<T>& dc_carry,
                                              Acc<T>& direct_carry) {
  using A = Acc<T>;
  constexpr int G = Cell::kGates;
  const int64_t H = p.hidden;
  const int64_t at = static_cast<int64_t>(b) * H + unit;
  in.d_h = d_h;
  if constexpr (Cell::kHasCell) {
    const T* d_cn = static_cast<const T*>(p.d_cn);
    in.d_c = s + 1 < row.length ? dc_carry : (d_cn != nullptr ? to_acc(d_cn[at]) : A(0));
  }

  const UnitBackward<A> res =
      Cell::backward(p.cell, in, load_unit_peephole<T, Cell>(p.peephole, H, unit));
  T* dx = seq_at<T>(p.d_xproj, row.t, b);
  T* dh = p.d_hproj.data != nullptr ? seq_at<T>(p.d_hproj, row.t, b) : nullptr;
  T* exchange = d_dst + static_cast<int64_t>(b) * G * H;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T dh_val = from_acc<T>(res.dh[g]);
    dx[g * H + unit] = from_acc<T>(res.dx[g]);
    if (dh != nullptr) dh[g * H + unit] = dh_val;
    exchange[g * H + unit] = dh_val;
  }
  if constexpr (Cell::kHasCell) {
    dc_carry = res.dc_prev;
    if (s == 0 && p.d_c0 != nullptr) static_cast<T*>(p.d_c0)[at] = from_acc<T>(res.dc_prev);
  }
  if constexpr (Cell::kNeedsHPrev) direct_carry = res.dh_direct;
}

// What the backward of one (batch row, unit) reads from the forward's sequences and from d_out at
// step s, loaded at the start of the step by the thread that owns the pair (own_item in the
// kernel), kept as stored until the cell backward uses it.
template <typename T>
struct StagedStep {
  UnitBackwardInput<T> in{};
  T d_out{};
};

template <class Cell, typename T>
__device__ __forceinline__ void stage_step(const RecurrenceBwdParams& p, int s, int b, int unit,
                                           StagedStep<T>& staged) {
  if (s < 0) return;
  const StepRow row = step_row(p, s, b);
  if (!row.valid) return;  // a padded step reads nothing
  staged.in = load_unit_backward_input<Cell, T, T>(p, s, b, unit, row);
  if (p.d_out.data != nullptr) staged.d_out = seq_at<const T>(p.d_out, row.t, b)[unit];
}

// A padded step: zero gradient rows for the unit, zero exchange row (read by nobody, but kept
// defined). The carried dh/dc stay as they are.
template <class Cell, typename T>
__device__ __forceinline__ void unit_padded(const RecurrenceBwdParams& p, int b, int unit,
                                            const StepRow& row, T* d_dst) {
  constexpr int G = Cell::kGates;
  const int64_t H = p.hidden;
  const T zero = from_acc<T>(Acc<T>(0));
  T* dx = seq_at<T>(p.d_xproj, row.t, b);
  T* dh = p.d_hproj.data != nullptr ? seq_at<T>(p.d_hproj, row.t, b) : nullptr;
  T* exchange = d_dst + static_cast<int64_t>(b) * G * H;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    dx[g * H + unit] = zero;
    if (dh != nullptr) dh[g * H + unit] = zero;
    exchange[g * H + unit] = zero;
  }
}

template <class Cell, typename T, bool kWeightsInSmem>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, 1)
    recurrence_backward_kernel(const __grid_constant__ BwdKernelArgs args) {
  using A = Acc<T>;
  constexpr int G = Cell::kGates;
  const RecurrenceGeometry& geo = args.geo;
  const int dir = static_cast<int>(blockIdx.x) / geo.blocks_per_dir;
  const int blk = static_cast<int>(blockIdx.x) - dir * geo.blocks_per_dir;
  const RecurrenceBwdParams& p = args.dir[dir];
  const int H = static_cast<int>(p.hidden);
  const int P = static_cast<int>(p.state);
  const int B = static_cast<int>(p.batch);
  const int GH = G * H;
  const int steps = static_cast<int>(p.seq_len);
  const bool projected = geo.projected;
  const int u0 = blk * geo.units_per_block;
  const int nu = max(0, min(H - u0, geo.units_per_block));
  // Phase-0 columns: the block's state columns (projected) or its units.
  const int c0 = projected ? blk * geo.cols_per_block : u0;
  const int nc = projected ? max(0, min(P - c0, geo.cols_per_block)) : nu;

  unsigned char* ws = static_cast<unsigned char*>(args.dir[0].workspace) +
                      static_cast<int64_t>(dir) * args.workspace.per_direction;
  T* d_exchange = reinterpret_cast<T*>(ws + args.workspace.offset[0]);   // 2 x [B, G*H]
  T* dh_exchange = reinterpret_cast<T*>(ws + args.workspace.offset[1]);  // [B, P]
  A* dc_state = reinterpret_cast<A*>(ws + args.workspace.offset[2]);     // [B, H]
  A* direct_state = reinterpret_cast<A*>(ws + args.workspace.offset[3]); // [B, H]

  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* w_hr = static_cast<const T*>(p.w_hr);
  const T* d_hn = static_cast<const T*>(p.d_hn);

  FUSEDRNN_DYNAMIC_SMEM(smem);
  T* act = smem_at<T>(smem, geo.smem_act);
  T* stage = smem_at<T>(smem, geo.smem_weights[0]);  // K-staged streaming's W_hh rows
  A* partials = smem_at<A>(smem, geo.smem_partials);
  const int64_t act_pitch = geo.act_pitch;
  // K-staged streaming (recurrence_layout.h): planned only for 16-bit kernels without projection.
  constexpr bool kCanKStage = !kWeightsInSmem && kIs16BitFloat<T>;
  const bool k_staged = kCanKStage && geo.stage_rows[0] > 0;
  int stage_calls = 0;  // K-staged products run so far (PassOrder)

  // Phase 0 row c (K = G*H): column c0 + c of W_hh. Phase 1 row u (K = P): column u0 + u of W_hr.
  WeightView<T> state_rows;
  WeightView<T> proj_rows;
  zero_padding_for_tensor_cores<kWeightsInSmem, T>(smem, geo.smem_bytes);
  if constexpr (kWeightsInSmem) {
    T* w0 = smem_at<T>(smem, geo.smem_weights[0]);
    T* w1 = smem_at<T>(smem, geo.smem_weights[1]);
    const int64_t pitch0 = geo.weight_pitch[0];
    const int64_t pitch1 = geo.weight_pitch[1];
    // Consecutive threads read consecutive columns of a W_hh row (coalesced where nc allows).
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nc) * GH; i += blockDim.x) {
      const int64_t j = i / nc;
      const int64_t c = i - j * nc;
      w0[c * pitch0 + j] = w_hh[j * P + c0 + c];
    }
    if (projected) {
      for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nu) * P; i += blockDim.x) {
        const int64_t k = i / nu;
        const int64_t u = i - k * nu;
        w1[u * pitch1 + k] = w_hr[k * H + u0 + u];
      }
    }
    state_rows = WeightView<T>{w0, max(nc, 1), 0, pitch0, 1};
    proj_rows = WeightView<T>{w1, max(nu, 1), 0, pitch1, 1};
    __syncthreads();
  } else {
    state_rows = WeightView<T>{w_hh + c0, max(nc, 1), 0, 1, P};
    proj_rows = WeightView<T>{projected ? w_hr + u0 : w_hr, max(nu, 1), 0, 1, H};
  }

  // Without projection, when each (batch row, unit) of the block has a thread of its own for the
  // whole sequence (one batch chunk, B * nc <= threads), that thread
  // - loads what its backward of step s reads from the forward's sequences (saved gates, c, out,
  //   d_out; at the anchor sizes from HBM) early, so that those loads overlap other work: at the
  //   start of step s, under the activation load and the product; with geo.inputs_ahead, right
  //   after step s+1's cell backward, under the grid barrier as well (see ItemThreads);
  // - carries its LSTM dc and GRU direct term in registers: the grid barrier empties L1, so a
  //   workspace read in the cell backward is an L2 round trip on the step's critical path.
  const bool own_item = !projected && geo.batch_chunk >= B && B * nc <= static_cast<int>(blockDim.x);
  const ItemThreads items(own_item, B * nc);
  const bool has_item = items.has_item();
  const bool ahead = geo.inputs_ahead;
  StagedStep<T> early;
  A dc_own = A(0);
  A direct_own = A(0);

  if (has_item && ahead) stage_step<Cell, T>(p, steps - 1, items.item / nc, c0 + items.item % nc, early);

  for (int s = steps - 1; s >= -1; --s) {
    // dpre_{s+1} (written last iteration); none at s = T-1, where every row takes d_hn.
    const T* d_src = s + 1 < steps ? d_exchange + static_cast<int64_t>((s + 1) & 1) * B * GH : nullptr;
    T* d_dst = d_exchange + static_cast<int64_t>(s & 1) * B * GH;

    if (has_item && !ahead) stage_step<Cell, T>(p, s, items.item / nc, c0 + items.item % nc, early);

    // ---- phase 0: dh for the block's columns (and, without projection, the cell backward)
    for (int b0 = 0; b0 < B; b0 += geo.batch_chunk) {
      const int nb = min(geo.batch_chunk, B - b0);
      const ProductTiling tiling = k_staged
                                       ? make_k_staged_tiling(nc, nb, geo.stage_rows[0])
                                       : product_tiling<kWeightsInSmem, T>(nc, nb, GH);
      if (d_src != nullptr && k_staged) {
        if constexpr (kCanKStage) {
          k_staged_product_partials<T>(w_hh + c0, P, nc, stage, geo.weight_pitch[0],
                                       geo.stage_rows[0], d_src + static_cast<int64_t>(b0) * GH,
                                       GH, act, act_pitch, nb, GH, partials, tiling,
                                       stage_calls++);
        }
      } else if (d_src != nullptr) {
        load_act_chunk(act, act_pitch, d_src + static_cast<int64_t>(b0) * GH, GH, nb, GH);
        __syncthreads();
        block_product_partials<kWeightsInSmem, kWeightsInSmem>(state_rows, nc, act, act_pitch,
                                                                nb, GH, partials, tiling);
        __syncthreads();
      }
      for (int i = items.first; i < nb * nc; i += blockDim.x) {
        const int bl = i / nc;
        const int c = i - bl * nc;
        const int b = b0 + bl;
        const int col = c0 + c;
        const int64_t length = p.lengths != nullptr ? p.lengths[b] : steps;
        A d_h;
        if (s + 1 < length) {
          d_h = product_value(partials, tiling, c, bl);
          if constexpr (Cell::kNeedsHPrev) {
            d_h += own_item ? direct_own : direct_state[static_cast<int64_t>(b) * H + col];
          }
        } else {
          d_h = d_hn != nullptr ? to_acc(d_hn[static_cast<int64_t>(b) * P + col]) : A(0);
        }
        if (s < 0) {
          static_cast<T*>(p.d_h0)[static_cast<int64_t>(b) * P + col] = from_acc<T>(d_h);
          continue;
        }
        const StepRow row = step_row(p, s, b);
        if (row.valid && p.d_out.data != nullptr) {
          d_h += to_acc(own_item ? early.d_out : seq_at<const T>(p.d_out, row.t, b)[col]);
        }
        if (projected) {
          const T d_val = from_acc<T>(row.valid ? d_h : A(0));
          seq_at<T>(p.d_h_seq, row.t, b)[col] = d_val;
          dh_exchange[static_cast<int64_t>(b) * P + col] = d_val;
        } else if (row.valid && own_item) {
          unit_backward<Cell, T>(p, s, b, col, row, widen<Cell, T>(early.in), d_h, d_dst, dc_own,
                                 direct_own);
        } else if (row.valid) {
          const int64_t at = static_cast<int64_t>(b) * H + col;
          unit_backward<Cell, T>(p, s, b, col, row,
                                 load_unit_backward_input<Cell, T>(p, s, b, col, row), d_h, d_dst,
                                 dc_state[at], direct_state[at]);
        } else {
          unit_padded<Cell, T>(p, b, col, row, d_dst);
        }
      }
      // act and partials are reused by the next chunk; after the last chunk a grid barrier
      // (which includes a block barrier) comes first.
      if (b0 + geo.batch_chunk < B) __syncthreads();
    }
    if (s < 0) break;  // uniform: every block reaches it at the same iteration
    // The previous step's inputs, read while the blocks exchange dpre_s (one chunk: the item's
    // cell backward of step s has used `early`).
    if (has_item && ahead) stage_step<Cell, T>(p, s - 1, items.item / nc, c0 + items.item % nc, early);

    // ---- phase 1 (projected LSTM): d_r = dh W_hr for the block's units, then the cell backward
    if (projected) {
      direction_barrier(geo.blocks_per_dir);  // dh of every state column is in dh_exchange
      for (int b0 = 0; b0 < B; b0 += geo.batch_chunk) {
        const int nb = min(geo.batch_chunk, B - b0);
        load_act_chunk(act, act_pitch, dh_exchange + static_cast<int64_t>(b0) * P, P, nb, P);
        __syncthreads();
        const ProductTiling tiling = product_tiling<kWeightsInSmem, T>(nu, nb, P);
        block_product_partials<kWeightsInSmem, kWeightsInSmem>(proj_rows, nu, act, act_pitch,
                                                                nb, P, partials, tiling);
        __syncthreads();
        for (int i = threadIdx.x; i < nb * nu; i += blockDim.x) {
          const int bl = i / nu;
          const int u = i - bl * nu;
          const int b = b0 + bl;
          const StepRow row = step_row(p, s, b);
          if (row.valid) {
            const int64_t at = static_cast<int64_t>(b) * H + u0 + u;
            unit_backward<Cell, T>(p, s, b, u0 + u, row,
                                   load_unit_backward_input<Cell, T>(p, s, b, u0 + u, row),
                                   product_value(partials, tiling, u, bl), d_dst, dc_state[at],
                                   direct_state[at]);
          } else {
            unit_padded<Cell, T>(p, b, u0 + u, row, d_dst);
          }
        }
        // act and partials are reused by the next chunk; after the last chunk a grid barrier
        // (which includes a block barrier) comes first.
        if (b0 + geo.batch_chunk < B) __syncthreads();
      }
    }
    direction_barrier(geo.blocks_per_dir);  // dpre_s complete in d_dst for every block
  }
}

}  // namespace fusedrnn::cuda
