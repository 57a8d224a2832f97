// The parameters of one cell step (CPU only): the cell update of fusedrnn/cell_math.h, on
// pre-activations torch has formed, or, at small batch, on products the pass forms itself.
//
// Why a step without the recurrence's product: a single step (LSTMCell/GRUCell/RNNCell, or a
// layer called with T = 1, as streaming inference does) would pay the recurrence kernel's
// per-call packing of W_hh (G*H*P elements, transposed) for one use of it. For one step, torch's
// two GEMMs (x W_ih^T and h W_hh^T, no packing) plus this one fused pointwise pass is the
// cheapest split, and its backward is the same: this pass, then torch's GEMMs.
//
// Notation as in params.h: B = batch, H = hidden, G = gate_count(cell), S = saved_gate_count(cell);
// "LSTM" means both LSTM cells, the plain one and the CIFG.
// Every array is dense row-major, holds `dtype` elements (float32, float64, or on the CPU
// bfloat16, computed in float32) and does not alias another unless said otherwise.
#pragma once

#include <cstdint>

#include "fusedrnn/cell_kind.h"

namespace fusedrnn {

struct CellStepShape {
  CellKind cell = CellKind::kLstm;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;   // B >= 1
  int64_t hidden = 0;  // H >= 1
};

struct CellStepFwdParams : CellStepShape {
  // [B, G*H] x W_ih^T. For LSTM and RNN it may already hold both products (x W_ih^T + h W_hh^T):
  // then hpre is nullptr. nullptr: the pass forms the products itself (below).
  const void* xpre = nullptr;
  // [B, G*H] h W_hh^T; nullptr for LSTM/RNN when xpre holds the sum. GRU: required when xpre is
  // given (its n gate multiplies the recurrent part by r).
  const void* hpre = nullptr;
  // Small batch, xpre == nullptr: the pass forms x W_ih^T and h_prev W_hh^T itself, reading the
  // weights where they lie (one row dot product per output, as the small-batch recurrence does).
  // At B=1 the two torch GEMM calls it saves cost more than the products. x [B, I] and
  // w_ih [G*H, I] are required then, and w_hh [G*H, P] with h_prev (no h_prev: a zero state, no
  // recurrent term). With xpre given, x, w_ih and w_hh must be null.
  const void* x = nullptr;
  const void* w_ih = nullptr;
  const void* w_hh = nullptr;
  int64_t input_size = 0;        // I
  int64_t state = 0;             // P (proj_size of a projected LSTM layer, else H)
  // [G*H] each, nullable (bias=False): added here, not by the GEMMs (a GEMM with a broadcast
  // bias is a separate, slower torch op on the CPU, and at B=1 every op costs microseconds).
  const void* b_ih = nullptr;
  const void* b_hh = nullptr;
  // [B, P] the previous hidden state: required by a GRU (P = H: h' = (1 - z) n + z h_prev);
  // the operand of the recurrent product when w_hh is set (nullable there: zeros).
  const void* h_prev = nullptr;
  const void* c_prev = nullptr;  // [B, H] LSTM only, nullable (zeros)
  void* h = nullptr;             // [B, H] h'
  void* c = nullptr;             // [B, H] LSTM only: c'
  // [B, S*H] saved for backward (LSTM i, f, g, o; CIFG f, g, o; GRU r, z, n, h_n), nullable
  // (inference); unused by the Elman RNN.
  void* gates = nullptr;
  // [B, H] nullable: a second copy of c' (LSTM) or h' (Elman RNN), the one the backward reads,
  // so that the tensors handed to the user are not saved ones (torch.nn's cells let a user
  // change c' in place before backward). Unused by a GRU.
  void* saved_state = nullptr;
  // [3, H] LSTM only, nullable: peephole weights as params.h has them ([2, H] for a CIFG).
  const void* peephole = nullptr;
  int64_t num_threads = 1;       // torch.get_num_threads()
};

struct CellStepBwdParams : CellStepShape {
  const void* gates = nullptr;   // [B, S*H] as saved by the forward (LSTM, GRU)
  const void* c = nullptr;       // [B, H] LSTM: c' (the forward's saved_state)
  const void* c_prev = nullptr;  // [B, H] LSTM, nullable (zeros)
  const void* h_prev = nullptr;  // [B, H] GRU (required)
  const void* h = nullptr;       // [B, H] Elman RNN: h' (the forward's saved_state)
  const void* d_h = nullptr;     // [B, H] gradient w.r.t. h', nullable (zeros)
  const void* d_c = nullptr;     // [B, H] LSTM: gradient w.r.t. c', nullable (zeros)
  void* d_xpre = nullptr;        // [B, G*H] gradient w.r.t. xpre (and hpre, except for a GRU)
  void* d_hpre = nullptr;        // [B, G*H] GRU only: gradient w.r.t. hpre (its n part is r times)
  void* d_c_prev = nullptr;      // [B, H] LSTM only
  void* d_h_prev = nullptr;      // [B, H] GRU only: the part of dh_prev that skips W_hh, z * d_h
  const void* peephole = nullptr;  // as in the forward, nullable
  int64_t num_threads = 1;
};

}  // namespace fusedrnn
