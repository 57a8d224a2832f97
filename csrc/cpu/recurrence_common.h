// What the recurrence (recurrence_impl.h) and the cell step (cell_step_impl.h) share, compiled
// per instruction set: the SIMD width and accumulator budget, index helpers, the step order of
// a direction with per-sequence lengths, and the layout of the gates saved for backward.
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "recurrence_common.h is included by the per-ISA translation units only"
#endif

#include <cstdint>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/params.h"
#include "recurrence_isa.h"
#include "simd_vec.h"
#include "storage.h"

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
// row[k * H + u], LSTM i, f, g, o, CIFG LSTM f, g, o and GRU r, z, n, h_n. The recurrence and
// the cell step (cell_step_impl.h) write and read them only through these, W units (n valid)
// at u.
template <typename S, typename V>
inline void store_saved_gates(const LstmGates<V>& gate, S* row, int64_t H, int64_t u, int n) {
  store_as(row + u, gate.i, n);
  store_as(row + H + u, gate.f, n);
  store_as(row + 2 * H + u, gate.g, n);
  store_as(row + 3 * H + u, gate.o, n);
}
template <typename S, typename V>
inline void store_saved_cifg_gates(const LstmGates<V>& gate, S* row, int64_t H, int64_t u, int n) {
  store_as(row + u, gate.f, n);
  store_as(row + H + u, gate.g, n);
  store_as(row + 2 * H + u, gate.o, n);
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
// A CIFG LSTM's f, g, o; i (not saved: 1 - f) is left zero.
template <typename V, typename S>
inline LstmGates<V> load_saved_cifg_gates(const S* row, int64_t H, int64_t u, int n) {
  return {V::zero(), load_as<V>(row + u, n), load_as<V>(row + H + u, n),
          load_as<V>(row + 2 * H + u, n)};
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

// The peephole weights of W units (n valid) at u, as cell_math.h's LSTM takes them: params.h's
// [3, H] rows w_ci, w_cf, w_co, or a CIFG LSTM's [2, H] rows w_cf, w_co.
template <CellKind C, typename V, typename S>
inline LstmPeephole<V> load_peephole(const S* peephole, int64_t H, int64_t u, int n) {
  if constexpr (C == CellKind::kLstmCifg) {
    return cifg_peephole(load_as<V>(peephole + u, n), load_as<V>(peephole + H + u, n));
  } else {
    return {load_as<V>(peephole + u, n), load_as<V>(peephole + H + u, n),
            load_as<V>(peephole + 2 * H + u, n)};
  }
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
