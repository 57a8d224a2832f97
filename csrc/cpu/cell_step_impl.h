// The pointwise cell step (fusedrnn/cell_step_params.h) on SIMD vectors, compiled per instruction
// set next to the recurrence (recurrence_isa_*.cpp include both).
//
// Rows are independent: a caller may split [0, B) among threads. The formulas are the ones of
// fusedrnn/cell_math.h, instantiated on Vec like the recurrence's fused epilogue; the saved gates,
// the SIMD width and the small-batch products are the recurrence's (recurrence_common.h, in_place_dots.h).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "cell_step_impl.h is included by the per-ISA translation units only"
#endif

#include <cstdint>
#include <type_traits>
#include <vector>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/cell_step_params.h"
#include "in_place_dots.h"
#include "recurrence_common.h"
#include "simd_vec.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// T: the compute type; S: what the tensors hold (storage.h: T itself, or bfloat16 with T float).
// Every tensor is read through load_as and written through store_as, so a bfloat16 step runs
// the float arithmetic of a float step on widened operands and rounds only what it stores.
// kPeephole: an LSTM (plain or CIFG) with peephole weights, a template flag as in the
// recurrence's forward_impl.
template <typename T, CellKind C, typename S, bool kPeephole = false>
void cell_step_forward_rows(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  constexpr bool kWiden = !std::is_same_v<S, T>;
  using V = Vec<T, W>;
  const int64_t H = p.hidden, I = p.input_size, P = p.state;
  // Products mode (xpre null) only; without h_prev (a zero state) there is no recurrent term.
  const S* w_ih = static_cast<const S*>(p.w_ih);
  const S* w_hh = p.xpre == nullptr && p.h_prev ? static_cast<const S*>(p.w_hh) : nullptr;
  // The products' vector operands in T (InPlaceDots reads the weights in their storage type,
  // the vector in T): a bfloat16 row of x and of h_prev is widened once per row here.
  std::vector<T> widened(kWiden && p.xpre == nullptr ? I + (w_hh ? P : 0) : 0);
  for (int64_t b = row_begin; b < row_end; ++b) {
    const S* x = p.xpre ? static_cast<const S*>(p.xpre) + b * G * H : nullptr;
    const T* x_in = nullptr;
    const T* h_in = nullptr;
    if (!x) {
      const S* x_row = static_cast<const S*>(p.x) + b * I;
      const S* h_row = w_hh ? static_cast<const S*>(p.h_prev) + b * P : nullptr;
      if constexpr (kWiden) {
        convert_row(widened.data(), x_row, I);
        if (h_row) convert_row(widened.data() + I, h_row, P);
        x_in = widened.data();
        h_in = h_row ? widened.data() + I : nullptr;
      } else {
        x_in = x_row;
        h_in = h_row;
      }
    }
    const S* hp = p.hpre ? static_cast<const S*>(p.hpre) + b * G * H : nullptr;
    S* h = static_cast<S*>(p.h) + b * H;
    S* gates = p.gates ? static_cast<S*>(p.gates) + b * saved_gate_count(C) * H : nullptr;
    for (int64_t u = 0; u < H; u += W) {
      const int n = static_cast<int>(imin(W, H - u));
      auto bias = [&](const void* b, int g) {
        return b ? load_as<V>(static_cast<const S*>(b) + g * H + u, n) : V::zero();
      };
      // Lane w: row g*H + u + w of `weights` (K wide) dotted with `v`.
      auto dots = [&](const S* weights, int64_t K, int g, const T* v) {
        const S* first = weights + (g * H + u) * K;
        return n == W ? InPlaceDots<T>::template dots<true>(first, K, n, v, K)
                      : InPlaceDots<T>::template dots<false>(first, K, n, v, K);
      };
      auto x_part = [&](int g) {
        const V product = x ? load_as<V>(x + g * H + u, n) : dots(w_ih, I, g, x_in);
        return product + bias(p.b_ih, g);
      };
      auto h_part = [&](int g) {
        const V product = hp ? load_as<V>(hp + g * H + u, n)
                             : h_in ? dots(w_hh, P, g, h_in) : V::zero();
        return product + bias(p.b_hh, g);
      };
      auto state_row = [&](const void* base) { return static_cast<const S*>(base) + b * H + u; };
      if constexpr (has_cell_state(C)) {
        const V c_prev = p.c_prev ? load_as<V>(state_row(p.c_prev), n) : V::zero();
        V c_next, r;
        const auto peephole = [&] {
          if constexpr (kPeephole) {
            return load_peephole<C, V>(static_cast<const S*>(p.peephole), H, u, n);
          } else {
            return NoPeephole{};
          }
        }();
        LstmGates<V> gate;  // (set in the branches: see forward_impl's cell update)
        if constexpr (C == CellKind::kLstmCifg) {
          gate = cifg_forward(x_part(0) + h_part(0), x_part(1) + h_part(1),
                              x_part(2) + h_part(2), c_prev, c_next, r, peephole);
        } else {
          gate = lstm_forward(x_part(0) + h_part(0), x_part(1) + h_part(1),
                              x_part(2) + h_part(2), x_part(3) + h_part(3), c_prev, c_next, r,
                              peephole);
        }
        store_as(h + u, r, n);
        store_as(static_cast<S*>(p.c) + b * H + u, c_next, n);
        if (p.saved_state) store_as(static_cast<S*>(p.saved_state) + b * H + u, c_next, n);
        if (gates) {
          if constexpr (C == CellKind::kLstmCifg) {
            store_saved_cifg_gates(gate, gates, H, u, n);
          } else {
            store_saved_gates(gate, gates, H, u, n);
          }
        }
      } else if constexpr (C == CellKind::kGru) {
        V h_next;
        const auto gate = gru_forward(x_part(0), x_part(1), x_part(2), h_part(0), h_part(1),
                                      h_part(2), load_as<V>(state_row(p.h_prev), n), h_next);
        store_as(h + u, h_next, n);
        if (gates) store_saved_gates(gate, gates, H, u, n);
      } else {
        const V h_next = rnn_forward(p.cell, x_part(0) + h_part(0));
        store_as(h + u, h_next, n);
        if (p.saved_state) store_as(static_cast<S*>(p.saved_state) + b * H + u, h_next, n);
      }
    }
  }
}

template <typename T, CellKind C, typename S>
void cell_step_backward_rows(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using V = Vec<T, W>;
  const int64_t H = p.hidden;
  const S* peephole = static_cast<const S*>(p.peephole);
  for (int64_t b = row_begin; b < row_end; ++b) {
    S* dx = static_cast<S*>(p.d_xpre) + b * G * H;
    const S* gates = p.gates ? static_cast<const S*>(p.gates) + b * saved_gate_count(C) * H : nullptr;
    for (int64_t u = 0; u < H; u += W) {
      const int n = static_cast<int>(imin(W, H - u));
      auto row = [&](const void* base) {
        return base ? load_as<V>(static_cast<const S*>(base) + b * H + u, n) : V::zero();
      };
      auto out_row = [&](void* base) { return static_cast<S*>(base) + b * H + u; };
      const V d_h = row(p.d_h);
      if constexpr (C == CellKind::kLstmCifg) {
        const auto gate = load_saved_cifg_gates<V>(gates, H, u, n);
        const auto grad =
            peephole ? cifg_backward(gate.f, gate.g, gate.o, row(p.c), row(p.c_prev), d_h,
                                     row(p.d_c), load_peephole<C, V>(peephole, H, u, n))
                     : cifg_backward(gate.f, gate.g, gate.o, row(p.c), row(p.c_prev), d_h,
                                     row(p.d_c));
        store_as(out_row(p.d_c_prev), grad.d_c_prev, n);
        const V parts[3] = {grad.d_f, grad.d_g, grad.d_o};
        for (int g = 0; g < 3; ++g) store_as(dx + g * H + u, parts[g], n);
      } else if constexpr (C == CellKind::kLstm) {
        const auto gate = load_saved_lstm_gates<V>(gates, H, u, n);
        const auto grad =
            peephole ? lstm_backward(gate, row(p.c), row(p.c_prev), d_h, row(p.d_c),
                                     load_peephole<C, V>(peephole, H, u, n))
                     : lstm_backward(gate, row(p.c), row(p.c_prev), d_h, row(p.d_c));
        store_as(out_row(p.d_c_prev), grad.d_c_prev, n);
        const V parts[4] = {grad.d_i, grad.d_f, grad.d_g, grad.d_o};
        for (int g = 0; g < 4; ++g) store_as(dx + g * H + u, parts[g], n);
      } else if constexpr (C == CellKind::kGru) {
        const auto gate = load_saved_gru_gates<V>(gates, H, u, n);
        const auto grad = gru_backward(gate, row(p.h_prev), d_h);
        store_as(out_row(p.d_h_prev), grad.d_h_prev_direct, n);
        S* dh = static_cast<S*>(p.d_hpre) + b * G * H;
        const V dxs[3] = {grad.dx_r, grad.dx_z, grad.dx_n};
        const V dhs[3] = {grad.dh_r, grad.dh_z, grad.dh_n};
        for (int g = 0; g < 3; ++g) {
          store_as(dx + g * H + u, dxs[g], n);
          store_as(dh + g * H + u, dhs[g], n);
        }
      } else {
        // Lane by lane: the relu derivative is a comparison, which Vec does not offer.
        const V h_next = row(p.h);
        V pre;
        for (int w = 0; w < W; ++w) {
          pre.v[w] = rnn_backward(p.cell, Vec<T, 1>(h_next.v[w]), Vec<T, 1>(d_h.v[w])).v;
        }
        store_as(dx + u, pre, n);
      }
    }
  }
}

template <typename T, CellKind C, typename S>
struct CellStepFwdRun {
  static int call(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end) {
    if constexpr (has_cell_state(C)) {
      if (p.peephole) {
        cell_step_forward_rows<T, C, S, true>(p, row_begin, row_end);
        return 0;
      }
    }
    cell_step_forward_rows<T, C, S>(p, row_begin, row_end);
    return 0;
  }
};
template <typename T, CellKind C, typename S>
struct CellStepBwdRun {
  static int call(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end) {
    cell_step_backward_rows<T, C, S>(p, row_begin, row_end);
    return 0;
  }
};

void cell_step_forward(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_cell_dtype<CellStepFwdRun>(p, row_begin, row_end);
}
void cell_step_backward(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_cell_dtype<CellStepBwdRun>(p, row_begin, row_end);
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
