// Per-cell glue between the generic recurrence kernels and the cell formulas of
// csrc/include/fusedrnn/cell_math.h (the only place the math lives). A traits struct says how many
// gate rows a unit has, what forward saves, which inputs backward needs, and maps the kernels'
// per-(batch row, unit) values onto the cell_math.h calls.
#pragma once

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/cell_math.h"
#include "dtype_traits.cuh"
#include "launch_compat.h"

namespace fusedrnn::cuda {

// One unit's forward result. h: the new state value (for an LSTM, r = o tanh(c'), which is h
// without projection); c: the new cell state (LSTM); saved: the values forward keeps for backward.
template <typename A>
struct UnitForward {
  A h = A(0);
  A c = A(0);
  A saved[4] = {A(0), A(0), A(0), A(0)};
};

// One unit's backward result. dx: gradient w.r.t. the input projection (per gate); dh: w.r.t. the
// recurrent product (equal to dx except for GRU); dc_prev: w.r.t. c_{t-1} (LSTM); dh_direct: the
// part of dh_{t-1} that bypasses W_hh (GRU).
template <typename A>
struct UnitBackward {
  A dx[4] = {A(0), A(0), A(0), A(0)};
  A dh[4] = {A(0), A(0), A(0), A(0)};
  A dc_prev = A(0);
  A dh_direct = A(0);
};

// Inputs of a unit's backward step; each cell reads only what it needs.
template <typename A>
struct UnitBackwardInput {
  A saved[4];   // as written by forward
  A c;          // c_t (LSTM)
  A c_prev;     // c_{t-1} (LSTM)
  A h_prev;     // h_{t-1} (GRU)
  A h_next;     // h_t (RNN)
  A d_h;        // total gradient w.r.t. the unit's state (r for a projected LSTM)
  A d_c;        // gradient reaching c_t from later steps (LSTM)
};

// The peephole weights of one LSTM unit (params.h), read by the thread that updates the unit;
// `present` is false for the plain LSTM and for the other cells, which ignore it.
template <typename A>
struct UnitPeephole {
  bool present = false;
  LstmPeephole<A> w{};
};

// peephole: params.h's [3, H] weights (T elements), a CIFG LSTM's [2, H], or null.
template <typename T, typename Cell>
__device__ __forceinline__ UnitPeephole<Acc<T>> load_unit_peephole(const void* peephole,
                                                                   int64_t H, int unit) {
  UnitPeephole<Acc<T>> out;
  if (peephole != nullptr) {
    const T* w = static_cast<const T*>(peephole);
    out.present = true;
    if constexpr (Cell::kKind == CellKind::kLstmCifg) {
      out.w = cifg_peephole(to_acc(w[unit]), to_acc(w[H + unit]));
    } else {
      out.w = {to_acc(w[unit]), to_acc(w[H + unit]), to_acc(w[2 * H + unit])};
    }
  }
  return out;
}

// fn(peephole weights) or fn(NoPeephole{}) for the plain update. The branch is uniform: every
// thread of a launch has peephole weights or none.
template <typename A, typename Fn>
__device__ __forceinline__ auto with_peephole(const UnitPeephole<A>& peephole, Fn fn) {
  return peephole.present ? fn(peephole.w) : fn(NoPeephole{});
}

// What both LSTM cells' traits share: a cell state; the backward reads neither h_{t-1} nor h_t.
struct LstmStateTraits {
  static constexpr bool kHasCell = true;
  static constexpr bool kNeedsHPrev = false;
  static constexpr bool kNeedsHNext = false;
};

struct LstmTraits : LstmStateTraits {
  static constexpr CellKind kKind = CellKind::kLstm;
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;

  template <typename A>
  __device__ __forceinline__ static UnitForward<A> forward(CellKind, const A* x, const A* hh,
                                                           A /*h_prev*/, A c_prev,
                                                           const UnitPeephole<A>& peephole) {
    UnitForward<A> out;
    const LstmGates<A> g = with_peephole(peephole, [&](const auto& w) {
      return lstm_forward(x[0] + hh[0], x[1] + hh[1], x[2] + hh[2], x[3] + hh[3], c_prev, out.c,
                          out.h, w);
    });
    out.saved[0] = g.i;
    out.saved[1] = g.f;
    out.saved[2] = g.g;
    out.saved[3] = g.o;
    return out;
  }

  template <typename A>
  __device__ __forceinline__ static UnitBackward<A> backward(CellKind,
                                                             const UnitBackwardInput<A>& in,
                                                             const UnitPeephole<A>& peephole) {
    const LstmGates<A> g{in.saved[0], in.saved[1], in.saved[2], in.saved[3]};
    const LstmGrads<A> d = with_peephole(peephole, [&](const auto& w) {
      return lstm_backward(g, in.c, in.c_prev, in.d_h, in.d_c, w);
    });
    UnitBackward<A> out;
    out.dx[0] = out.dh[0] = d.d_i;
    out.dx[1] = out.dh[1] = d.d_f;
    out.dx[2] = out.dh[2] = d.d_g;
    out.dx[3] = out.dh[3] = d.d_o;
    out.dc_prev = d.d_c_prev;
    return out;
  }
};

// The CIFG LSTM: three gate rows f, g, o; saves f, g, o (i = 1 - f).
struct CifgTraits : LstmStateTraits {
  static constexpr CellKind kKind = CellKind::kLstmCifg;
  static constexpr int kGates = 3;
  static constexpr int kSaved = 3;

  template <typename A>
  __device__ __forceinline__ static UnitForward<A> forward(CellKind, const A* x, const A* hh,
                                                           A /*h_prev*/, A c_prev,
                                                           const UnitPeephole<A>& peephole) {
    UnitForward<A> out;
    const LstmGates<A> g = with_peephole(peephole, [&](const auto& w) {
      return cifg_forward(x[0] + hh[0], x[1] + hh[1], x[2] + hh[2], c_prev, out.c, out.h, w);
    });
    out.saved[0] = g.f;
    out.saved[1] = g.g;
    out.saved[2] = g.o;
    return out;
  }

  template <typename A>
  __device__ __forceinline__ static UnitBackward<A> backward(CellKind,
                                                             const UnitBackwardInput<A>& in,
                                                             const UnitPeephole<A>& peephole) {
    const CifgGrads<A> d = with_peephole(peephole, [&](const auto& w) {
      return cifg_backward(in.saved[0], in.saved[1], in.saved[2], in.c, in.c_prev, in.d_h,
                           in.d_c, w);
    });
    UnitBackward<A> out;
    out.dx[0] = out.dh[0] = d.d_f;
    out.dx[1] = out.dh[1] = d.d_g;
    out.dx[2] = out.dh[2] = d.d_o;
    out.dc_prev = d.d_c_prev;
    return out;
  }
};

struct GruTraits {
  static constexpr CellKind kKind = CellKind::kGru;
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kHasCell = false;
  static constexpr bool kNeedsHPrev = true;
  static constexpr bool kNeedsHNext = false;

  template <typename A>
  __device__ __forceinline__ static UnitForward<A> forward(CellKind, const A* x, const A* hh,
                                                           A h_prev, A /*c_prev*/,
                                                           const UnitPeephole<A>&) {
    UnitForward<A> out;
    const GruGates<A> g = gru_forward(x[0], x[1], x[2], hh[0], hh[1], hh[2], h_prev, out.h);
    out.saved[0] = g.r;
    out.saved[1] = g.z;
    out.saved[2] = g.n;
    out.saved[3] = g.h_n;
    return out;
  }

  template <typename A>
  __device__ __forceinline__ static UnitBackward<A> backward(CellKind,
                                                             const UnitBackwardInput<A>& in,
                                                             const UnitPeephole<A>&) {
    GruGates<A> g;
    g.r = in.saved[0];
    g.z = in.saved[1];
    g.n = in.saved[2];
    g.h_n = in.saved[3];
    const GruGrads<A> d = gru_backward(g, in.h_prev, in.d_h);
    UnitBackward<A> out;
    out.dx[0] = d.dx_r;
    out.dx[1] = d.dx_z;
    out.dx[2] = d.dx_n;
    out.dh[0] = d.dh_r;
    out.dh[1] = d.dh_z;
    out.dh[2] = d.dh_n;
    out.dh_direct = d.d_h_prev_direct;
    return out;
  }
};

// Elman RNN, tanh or relu: one kernel for both, the nonlinearity is the runtime cell kind.
struct RnnTraits {
  static constexpr CellKind kKind = CellKind::kRnnTanh;
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;
  static constexpr bool kHasCell = false;
  static constexpr bool kNeedsHPrev = false;
  static constexpr bool kNeedsHNext = true;

  template <typename A>
  __device__ __forceinline__ static UnitForward<A> forward(CellKind cell, const A* x, const A* hh,
                                                           A /*h_prev*/, A /*c_prev*/,
                                                           const UnitPeephole<A>&) {
    UnitForward<A> out;
    out.h = rnn_forward(cell, x[0] + hh[0]);
    return out;
  }

  template <typename A>
  __device__ __forceinline__ static UnitBackward<A> backward(CellKind cell,
                                                             const UnitBackwardInput<A>& in,
                                                             const UnitPeephole<A>&) {
    UnitBackward<A> out;
    out.dx[0] = out.dh[0] = rnn_backward(cell, in.h_next, in.d_h);
    return out;
  }
};

}  // namespace fusedrnn::cuda
