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
// Workspace (per direction, carved by recurrence_layouts.h): the packed weights, double-buffered
// h (forward) or d_pre (backward) so that step s+1 can start writing while slow threads still
// read step s, and the per-unit states (c, d_h, d_c).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "recurrence_impl.h is included by the per-ISA translation units only"
#endif

#include <cstdint>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/params.h"
#include "recurrence_backward.h"
#include "recurrence_common.h"
#include "recurrence_forward.h"
#include "recurrence_isa.h"
#include "recurrence_layouts.h"
#include "thread_team.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

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
      case CellKind::kLstmCifg:
        return Fn<T, CellKind::kLstmCifg, S>::call(p, args...);
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
    if constexpr (has_cell_state(C)) {
      if (p.peephole) {
        forward_impl<T, C, S, true>(p, team);
        return 0;
      }
    }
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
