// The pointwise cell step (fusedrnn/cell_step_params.h) on SIMD vectors, compiled per instruction
// set next to the recurrence (recurrence_isa_*.cpp include this after recurrence_impl.h).
//
// Rows are independent: a caller may split [0, B) among threads. The formulas are the ones of
// fusedrnn/cell_math.h, instantiated on Vec like the recurrence's fused epilogue; the saved gates,
// the SIMD width and the small-batch products are the recurrence's (recurrence_impl.h).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "cell_step_impl.h is included by the per-ISA translation units only"
#endif

#include <cstdint>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/cell_step_params.h"
#include "simd_vec.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

template <typename T, CellKind C>
void cell_step_forward_rows(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using V = Vec<T, W>;
  const int64_t H = p.hidden, I = p.input_size, P = p.state;
  // Products mode (xpre null) only; without h_prev (a zero state) there is no recurrent term.
  const T* w_ih = static_cast<const T*>(p.w_ih);
  const T* w_hh = p.xpre == nullptr && p.h_prev ? static_cast<const T*>(p.w_hh) : nullptr;
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* x = p.xpre ? static_cast<const T*>(p.xpre) + b * G * H : nullptr;
    const T* x_in = x ? nullptr : static_cast<const T*>(p.x) + b * I;
    const T* h_in = w_hh ? static_cast<const T*>(p.h_prev) + b * P : nullptr;
    const T* hp = p.hpre ? static_cast<const T*>(p.hpre) + b * G * H : nullptr;
    T* h = static_cast<T*>(p.h) + b * H;
    T* gates = p.gates ? static_cast<T*>(p.gates) + b * saved_gate_count(C) * H : nullptr;
    for (int64_t u = 0; u < H; u += W) {
      const int n = static_cast<int>(imin(W, H - u));
      auto bias = [&](const void* b, int g) {
        return b ? V::load_partial(static_cast<const T*>(b) + g * H + u, n) : V::zero();
      };
      // Lane w: row g*H + u + w of `weights` (K wide) dotted with `v`.
      auto dots = [&](const T* weights, int64_t K, int g, const T* v) {
        const T* first = weights + (g * H + u) * K;
        return n == W ? InPlaceDots<T>::template dots<true>(first, K, n, v, K)
                      : InPlaceDots<T>::template dots<false>(first, K, n, v, K);
      };
      auto x_part = [&](int g) {
        const V product = x ? V::load_partial(x + g * H + u, n) : dots(w_ih, I, g, x_in);
        return product + bias(p.b_ih, g);
      };
      auto h_part = [&](int g) {
        const V product = hp ? V::load_partial(hp + g * H + u, n)
                             : h_in ? dots(w_hh, P, g, h_in) : V::zero();
        return product + bias(p.b_hh, g);
      };
      if constexpr (C == CellKind::kLstm) {
        const V c_prev =
            p.c_prev ? V::load_partial(static_cast<const T*>(p.c_prev) + b * H + u, n) : V::zero();
        V c_next, r;
        const auto gate = lstm_forward(x_part(0) + h_part(0), x_part(1) + h_part(1),
                                       x_part(2) + h_part(2), x_part(3) + h_part(3), c_prev,
                                       c_next, r);
        r.store_partial(h + u, n);
        c_next.store_partial(static_cast<T*>(p.c) + b * H + u, n);
        if (p.saved_state) c_next.store_partial(static_cast<T*>(p.saved_state) + b * H + u, n);
        if (gates) store_saved_gates(gate, gates, H, u, n);
      } else if constexpr (C == CellKind::kGru) {
        V h_next;
        const auto gate =
            gru_forward(x_part(0), x_part(1), x_part(2), h_part(0), h_part(1), h_part(2),
                        V::load_partial(static_cast<const T*>(p.h_prev) + b * H + u, n), h_next);
        h_next.store_partial(h + u, n);
        if (gates) store_saved_gates(gate, gates, H, u, n);
      } else {
        const V h_next = rnn_forward(p.cell, x_part(0) + h_part(0));
        h_next.store_partial(h + u, n);
        if (p.saved_state) h_next.store_partial(static_cast<T*>(p.saved_state) + b * H + u, n);
      }
    }
  }
}

template <typename T, CellKind C>
void cell_step_backward_rows(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using V = Vec<T, W>;
  const int64_t H = p.hidden;
  for (int64_t b = row_begin; b < row_end; ++b) {
    T* dx = static_cast<T*>(p.d_xpre) + b * G * H;
    const T* gates = p.gates ? static_cast<const T*>(p.gates) + b * saved_gate_count(C) * H : nullptr;
    for (int64_t u = 0; u < H; u += W) {
      const int n = static_cast<int>(imin(W, H - u));
      auto row = [&](const void* base) {
        return base ? V::load_partial(static_cast<const T*>(base) + b * H + u, n) : V::zero();
      };
      const V d_h = row(p.d_h);
      if constexpr (C == CellKind::kLstm) {
        const auto gate = load_saved_lstm_gates<V>(gates, H, u, n);
        const auto grad = lstm_backward(gate, row(p.c), row(p.c_prev), d_h, row(p.d_c));
        grad.d_c_prev.store_partial(static_cast<T*>(p.d_c_prev) + b * H + u, n);
        const V parts[4] = {grad.d_i, grad.d_f, grad.d_g, grad.d_o};
        for (int g = 0; g < 4; ++g) parts[g].store_partial(dx + g * H + u, n);
      } else if constexpr (C == CellKind::kGru) {
        const auto gate = load_saved_gru_gates<V>(gates, H, u, n);
        const auto grad = gru_backward(gate, row(p.h_prev), d_h);
        grad.d_h_prev_direct.store_partial(static_cast<T*>(p.d_h_prev) + b * H + u, n);
        T* dh = static_cast<T*>(p.d_hpre) + b * G * H;
        const V dxs[3] = {grad.dx_r, grad.dx_z, grad.dx_n};
        const V dhs[3] = {grad.dh_r, grad.dh_z, grad.dh_n};
        for (int g = 0; g < 3; ++g) {
          dxs[g].store_partial(dx + g * H + u, n);
          dhs[g].store_partial(dh + g * H + u, n);
        }
      } else {
        // Lane by lane: the relu derivative is a comparison, which Vec does not offer.
        const V h_next = row(p.h);
        V pre;
        for (int w = 0; w < W; ++w) {
          pre.v[w] = rnn_backward(p.cell, Vec<T, 1>(h_next.v[w]), Vec<T, 1>(d_h.v[w])).v;
        }
        pre.store_partial(dx + u, n);
      }
    }
  }
}

template <typename T, CellKind C, typename S>
struct CellStepFwdRun {
  static int call(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end) {
    cell_step_forward_rows<T, C>(p, row_begin, row_end);
    return 0;
  }
};
template <typename T, CellKind C, typename S>
struct CellStepBwdRun {
  static int call(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end) {
    cell_step_backward_rows<T, C>(p, row_begin, row_end);
    return 0;
  }
};

void cell_step_forward(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_cell_dtype<CellStepFwdRun, false>(p, row_begin, row_end);
}
void cell_step_backward(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_cell_dtype<CellStepBwdRun, false>(p, row_begin, row_end);
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
