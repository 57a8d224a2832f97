// The parameters of one native recurrence call: one layer, one direction, the whole sequence.
//
// This is the whole extension/torch boundary (DESIGN.md, "Boundaries"): Python allocates every
// tensor with torch and fills these structs with data pointers, sizes and element strides; the
// native side reads and writes through them and allocates no device memory. A native entry point
// takes a list of 1 or 2 of these (the directions of one layer), which must agree on cell, dtype,
// sizes and lengths; a backend may run them concurrently.
//
// Notation: T = seq_len, B = batch, H = hidden, P = state (proj_size if > 0, else H),
// G = gate_count(cell), S = saved_gate_count(cell); "LSTM" means both LSTM cells (the plain
// one and the CIFG: has_cell_state). All pointers refer to memory of the backend's
// device (host memory for _cpu and _emu), hold `dtype` elements unless said otherwise, and do not
// alias one another unless said otherwise.
//
// Sequence tensors are [T, B, X] with arbitrary element strides for T and B and a contiguous last
// dimension, so batch_first inputs and one direction's half of a bidirectional output are read and
// written in place. Matrices and [B, X] states are dense row-major.
//
// Lengths: with `lengths` set, sequence b is valid at steps t < lengths[b]. At a padded step the
// state of b stays unchanged, its output row is written as zeros, and its gradient rows are written
// as zeros. The reverse direction processes t = lengths[b]-1 down to 0, starting from h0/c0.
#pragma once

#include <cstdint>

#include "fusedrnn/cell_kind.h"

namespace fusedrnn {

// A [T, B, X] tensor; element (t, b, x) lives at data[t * stride_t + b * stride_b + x].
struct SeqTensor {
  void* data = nullptr;
  int64_t stride_t = 0;
  int64_t stride_b = 0;
};

struct RecurrenceShape {
  CellKind cell = CellKind::kLstm;
  DType dtype = DType::kFloat32;
  int64_t seq_len = 0;  // T >= 1
  int64_t batch = 0;    // B >= 1
  int64_t hidden = 0;   // H >= 1
  int64_t state = 0;    // P: proj_size for a projected LSTM, else H
  bool reverse = false; // process t = T-1 .. 0 (per-sequence: lengths[b]-1 .. 0)
  // [B] int64, nullable (all sequences have length T). Every entry in [1, T]; the same pointer
  // for both directions of a layer.
  const int64_t* lengths = nullptr;
};

struct RecurrenceFwdParams : RecurrenceShape {
  // --- read ---
  // [T, B, G*H] input projection x_t W_ih^T + b_ih, gate blocks in torch order. It does NOT hold
  // b_hh: the kernel adds b_hh to the recurrent product (GRU needs b_hn inside r * (...)).
  SeqTensor xproj;
  const void* w_hh = nullptr;  // [G*H, P]
  const void* b_hh = nullptr;  // [G*H], nullable (bias=False)
  const void* w_hr = nullptr;  // [P, H], LSTM with proj_size only, else nullptr
  // [3, H] LSTM only, nullable: the peephole weights w_ci, w_cf, w_co (cell_math.h), rows in
  // that order; a CIFG LSTM's are [2, H], w_cf and w_co. Null: no peephole connections.
  const void* peephole = nullptr;
  const void* h0 = nullptr;    // [B, P], nullable (zeros)
  const void* c0 = nullptr;    // [B, H], LSTM only, nullable (zeros)
  // --- write ---
  SeqTensor out;               // [T, B, P] h_t (zeros at padded steps)
  void* hn = nullptr;          // [B, P] state after each sequence's last valid step
  void* cn = nullptr;          // [B, H] LSTM only
  // Saved for backward; all nullable together (inference). With them set, training forward.
  SeqTensor gates;             // [T, B, S*H] see saved_gate_count (unused for RNN)
                               // _cpu, LSTM: may be xproj itself (a row's xproj is read before
                               // that row's gates are written, by the same thread)
  SeqTensor c_seq;             // [T, B, H] LSTM: c_t after step t. Rows of padded steps are
                               // left unwritten: a peephole LSTM's weight gradient reads the
                               // zeros Python put there (_layer_recurrence._peephole_grad)
  SeqTensor r_seq;             // [T, B, H] projected LSTM: o_t * tanh(c_t), the input of W_hr
  // --- execution ---
  int64_t num_threads = 1;     // CPU: threads to use (torch.get_num_threads()); ignored on CUDA
  int64_t cuda_stream = 0;     // CUDA: cudaStream_t as an integer; ignored elsewhere
  void* workspace = nullptr;   // scratch of workspace_bytes, from the backend's *_workspace_bytes
  int64_t workspace_bytes = 0;
};

struct RecurrenceBwdParams : RecurrenceShape {
  // --- read: the forward's inputs and what it saved ---
  const void* w_hh = nullptr;  // [G*H, P]
  const void* b_hh = nullptr;  // [G*H], nullable; unused by the math but kept for symmetry
  const void* w_hr = nullptr;  // [P, H] projected LSTM only
  const void* peephole = nullptr;  // [3, H] ([2, H] CIFG) as in forward, nullable
  const void* h0 = nullptr;    // [B, P], nullable (zeros)
  const void* c0 = nullptr;    // [B, H], LSTM only, nullable (zeros)
  SeqTensor out;               // [T, B, P] forward output; supplies h_{t-1} (h0 at the first step)
  SeqTensor gates;             // [T, B, S*H] as saved by forward (LSTM, GRU)
  SeqTensor c_seq;             // [T, B, H] LSTM
  // --- read: incoming gradients, each nullable (zeros) ---
  SeqTensor d_out;             // [T, B, P]
  const void* d_hn = nullptr;  // [B, P]
  const void* d_cn = nullptr;  // [B, H] LSTM only
  // --- write ---
  // [T, B, G*H] gradient w.r.t. the input projection (xproj + b_ih): gives dW_ih, db_ih, dx.
  SeqTensor d_xproj;
  // [T, B, G*H] gradient w.r.t. the recurrent product (h_{t-1} W_hh^T + b_hh): gives dW_hh, db_hh.
  // Equal to d_xproj for LSTM and RNN, so there it may be nullptr (not written); GRU needs it.
  SeqTensor d_hproj;
  // [T, B, P] total gradient w.r.t. h_t (d_out plus the recurrent part), projected LSTM only:
  // dW_hr = sum_t d_h_seq_t^T r_seq_t. Nullable elsewhere.
  SeqTensor d_h_seq;
  void* d_h0 = nullptr;        // [B, P]
  void* d_c0 = nullptr;        // [B, H] LSTM only
  // --- execution ---
  int64_t num_threads = 1;
  int64_t cuda_stream = 0;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

}  // namespace fusedrnn
