// The cell formulas: the only place in fusedrnn where LSTM, GRU and Elman-RNN math is written.
// Every backend (CPU, CUDA, emulator) calls these per (batch row, hidden unit) after it has formed
// the pre-activations; `Acc` is the accumulation type (float for fp32/fp16/bf16, double for fp64).
//
// Pre-activations follow torch: for gate k, x_k = (x W_ih^T + b_ih)_k and h_k = (h W_hh^T + b_hh)_k.
//   LSTM: i = s(x_i + h_i), f = s(x_f + h_f), g = tanh(x_g + h_g), o = s(x_o + h_o)
//         c' = f c + i g, r = o tanh(c'), h' = r (or r W_hr^T with proj_size)
//         With peephole connections (Gers, Schraudolph & Schmidhuber 2002; w_c* diagonal, one
//         weight per unit): i = s(x_i + h_i + w_ci c), f = s(x_f + h_f + w_cf c),
//         o = s(x_o + h_o + w_co c'), the output gate looking at the NEW cell state.
//   CIFG LSTM (coupled input and forget gates, Greff et al. 2017): gates f, g, o only, i = 1 - f
//         (with peepholes w_cf and w_co); written below as the LSTM it equals.
//   GRU:  r = s(x_r + h_r), z = s(x_z + h_z), n = tanh(x_n + r h_n), h' = (1 - z) n + z h
//   RNN:  h' = tanh(x + h) or relu(x + h)
#pragma once

#include <cmath>
#include <type_traits>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/macros.h"

namespace fusedrnn {

FUSEDRNN_HOST_DEVICE float act_tanh(float x) { return tanhf(x); }
FUSEDRNN_HOST_DEVICE double act_tanh(double x) { return tanh(x); }
FUSEDRNN_HOST_DEVICE float act_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
FUSEDRNN_HOST_DEVICE double act_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
// NaN stays NaN and -0 stays -0, as torch.relu has it (x > 0 ? x : 0 turned a NaN into 0).
template <typename Acc>
FUSEDRNN_HOST_DEVICE Acc act_relu(Acc x) { return x < Acc(0) ? Acc(0) : x; }

// ---------------------------------------------------------------- LSTM
template <typename Acc>
struct LstmGates {
  Acc i, f, g, o;  // post-activation
};

// The peephole weights of one unit (or one vector of units): w_ci, w_cf, w_co.
template <typename Acc>
struct LstmPeephole {
  Acc i, f, o;
};

// The plain LSTM: no peephole terms at all (not zero weights, which would still cost the
// multiply-adds and turn an infinite c into NaN).
struct NoPeephole {};

template <typename Peephole>
inline constexpr bool kHasPeephole = !std::is_same<Peephole, NoPeephole>::value;

// pre_* = x_k + h_k. Returns the gates; writes the new cell state and r = o tanh(c').
template <typename Acc, typename Peephole = NoPeephole>
FUSEDRNN_HOST_DEVICE LstmGates<Acc> lstm_forward(Acc pre_i, Acc pre_f, Acc pre_g, Acc pre_o,
                                                 Acc c_prev, Acc& c_next, Acc& r,
                                                 const Peephole& peephole = {}) {
  if constexpr (kHasPeephole<Peephole>) {
    pre_i = pre_i + peephole.i * c_prev;
    pre_f = pre_f + peephole.f * c_prev;
  }
  LstmGates<Acc> gate;
  gate.i = act_sigmoid(pre_i);
  gate.f = act_sigmoid(pre_f);
  gate.g = act_tanh(pre_g);
  c_next = gate.f * c_prev + gate.i * gate.g;
  if constexpr (kHasPeephole<Peephole>) pre_o = pre_o + peephole.o * c_next;
  gate.o = act_sigmoid(pre_o);
  r = gate.o * act_tanh(c_next);
  return gate;
}

template <typename Acc>
struct LstmGrads {
  Acc d_i, d_f, d_g, d_o;  // gradients w.r.t. the pre-activations (x_k + h_k)
  Acc d_c_prev;            // gradient w.r.t. c_{t-1}
};

// d_r: gradient w.r.t. r = o tanh(c) (equal to dh without projection);
// d_c: gradient reaching c_t from step t+1 (and from c_n). With peephole connections c_t also
// feeds o_t, and c_{t-1} feeds i_t and f_t: those paths join d_c_total and d_c_prev. (The
// gradients of the peephole weights themselves, sums over steps and batch rows of d_i c_{t-1},
// d_f c_{t-1} and d_o c_t, are time-parallel reductions left to torch.)
template <typename Acc, typename Peephole = NoPeephole>
FUSEDRNN_HOST_DEVICE LstmGrads<Acc> lstm_backward(const LstmGates<Acc>& gate, Acc c, Acc c_prev,
                                                  Acc d_r, Acc d_c,
                                                  const Peephole& peephole = {}) {
  const Acc tanh_c = act_tanh(c);
  LstmGrads<Acc> grad;
  grad.d_o = d_r * tanh_c * gate.o * (Acc(1) - gate.o);
  Acc d_c_total = d_c + d_r * gate.o * (Acc(1) - tanh_c * tanh_c);
  if constexpr (kHasPeephole<Peephole>) d_c_total = d_c_total + grad.d_o * peephole.o;
  grad.d_i = d_c_total * gate.g * gate.i * (Acc(1) - gate.i);
  grad.d_f = d_c_total * c_prev * gate.f * (Acc(1) - gate.f);
  grad.d_g = d_c_total * gate.i * (Acc(1) - gate.g * gate.g);
  grad.d_c_prev = d_c_total * gate.f;
  if constexpr (kHasPeephole<Peephole>) {
    grad.d_c_prev = grad.d_c_prev + grad.d_i * peephole.i + grad.d_f * peephole.f;
  }
  return grad;
}

// ---------------------------------------------------------------- CIFG LSTM
// The CIFG LSTM is the LSTM whose input-gate pre-activation is minus the forget gate's, since
// s(-a) = 1 - s(a): with peepholes, w_ci = -w_cf. The functions below say exactly that and call
// the LSTM's, so the formulas exist once; a CIFG kernel does three gates' product, not four.

// The LSTM peephole weights a CIFG unit with w_cf, w_co (params.h: [2, H]) stands for.
template <typename Acc>
FUSEDRNN_HOST_DEVICE LstmPeephole<Acc> cifg_peephole(Acc w_cf, Acc w_co) {
  return {-w_cf, w_cf, w_co};
}

// pre_* = x_k + h_k of the gates f, g, o; peephole: NoPeephole or cifg_peephole(...). Returns
// all four gates (i = 1 - f); a CIFG kernel saves f, g, o.
template <typename Acc, typename Peephole = NoPeephole>
FUSEDRNN_HOST_DEVICE LstmGates<Acc> cifg_forward(Acc pre_f, Acc pre_g, Acc pre_o, Acc c_prev,
                                                 Acc& c_next, Acc& r,
                                                 const Peephole& peephole = {}) {
  return lstm_forward(-pre_f, pre_f, pre_g, pre_o, c_prev, c_next, r, peephole);
}

template <typename Acc>
struct CifgGrads {
  Acc d_f, d_g, d_o;  // gradients w.r.t. the pre-activations of f, g, o
  Acc d_c_prev;       // gradient w.r.t. c_{t-1}
};

// f, g, o: the saved gates; the rest as lstm_backward's.
template <typename Acc, typename Peephole = NoPeephole>
FUSEDRNN_HOST_DEVICE CifgGrads<Acc> cifg_backward(Acc f, Acc g, Acc o, Acc c, Acc c_prev,
                                                  Acc d_r, Acc d_c,
                                                  const Peephole& peephole = {}) {
  const LstmGates<Acc> gate{Acc(1) - f, f, g, o};
  const LstmGrads<Acc> d = lstm_backward(gate, c, c_prev, d_r, d_c, peephole);
  // The forget gate's pre-activation also feeds i, negated.
  return {d.d_f - d.d_i, d.d_g, d.d_o, d.d_c_prev};
}

// ---------------------------------------------------------------- GRU
template <typename Acc>
struct GruGates {
  Acc r, z, n;  // post-activation
  Acc h_n;      // W_hn h + b_hn, saved because dr needs it
};

// x_*: input projection (with b_ih); h_*: recurrent product (with b_hh). Writes h'.
template <typename Acc>
FUSEDRNN_HOST_DEVICE GruGates<Acc> gru_forward(Acc x_r, Acc x_z, Acc x_n, Acc h_r, Acc h_z,
                                               Acc h_n, Acc h_prev, Acc& h_next) {
  GruGates<Acc> gate;
  gate.r = act_sigmoid(x_r + h_r);
  gate.z = act_sigmoid(x_z + h_z);
  gate.n = act_tanh(x_n + gate.r * h_n);
  gate.h_n = h_n;
  h_next = (Acc(1) - gate.z) * gate.n + gate.z * h_prev;
  return gate;
}

template <typename Acc>
struct GruGrads {
  Acc dx_r, dx_z, dx_n;  // w.r.t. the input projection
  Acc dh_r, dh_z, dh_n;  // w.r.t. the recurrent product (dh_r == dx_r, dh_z == dx_z)
  Acc d_h_prev_direct;   // the part of dh_{t-1} that does not go through W_hh
};

// d_h: total gradient w.r.t. h_t.
template <typename Acc>
FUSEDRNN_HOST_DEVICE GruGrads<Acc> gru_backward(const GruGates<Acc>& gate, Acc h_prev, Acc d_h) {
  GruGrads<Acc> grad;
  const Acc d_n = d_h * (Acc(1) - gate.z);
  const Acc d_z = d_h * (h_prev - gate.n);
  grad.d_h_prev_direct = d_h * gate.z;
  grad.dx_n = d_n * (Acc(1) - gate.n * gate.n);
  grad.dh_n = grad.dx_n * gate.r;
  const Acc d_r = grad.dx_n * gate.h_n;
  grad.dx_r = d_r * gate.r * (Acc(1) - gate.r);
  grad.dx_z = d_z * gate.z * (Acc(1) - gate.z);
  grad.dh_r = grad.dx_r;
  grad.dh_z = grad.dx_z;
  return grad;
}

// ---------------------------------------------------------------- Elman RNN
template <typename Acc>
FUSEDRNN_HOST_DEVICE Acc rnn_forward(CellKind cell, Acc pre) {
  return cell == CellKind::kRnnRelu ? act_relu(pre) : act_tanh(pre);
}

// Gradient w.r.t. the pre-activation, from h' = act(pre) and d_h.
template <typename Acc>
FUSEDRNN_HOST_DEVICE Acc rnn_backward(CellKind cell, Acc h_next, Acc d_h) {
  // relu: the gradient passes where h' is not <= 0, a NaN h' included (torch's
  // threshold_backward).
  return cell == CellKind::kRnnRelu ? (h_next <= Acc(0) ? Acc(0) : d_h)
                                    : d_h * (Acc(1) - h_next * h_next);
}

}  // namespace fusedrnn
