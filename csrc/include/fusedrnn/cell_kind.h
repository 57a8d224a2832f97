// The cell kinds and element types every backend understands, with the integer codes that
// cross the Python boundary (python/fusedrnn/_backend.py mirrors them; keep both in sync).
#pragma once

#include <cstdint>

#include "fusedrnn/macros.h"

namespace fusedrnn {

enum class CellKind : int32_t {
  kLstm = 0,     // gates i, f, g, o (torch order)
  kGru = 1,      // gates r, z, n (torch order), b_hn inside r * (W_hn h + b_hn)
  kRnnTanh = 2,  // h = tanh(pre)
  kRnnRelu = 3,  // h = relu(pre)
  kLstmCifg = 4, // LSTM with coupled input and forget gates: gates f, g, o; i = 1 - f
};

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,   // CUDA only; the CPU path upcasts in Python
  kBFloat16 = 3,  // CUDA; on the CPU as storage only, computed in float (csrc/cpu/storage.h)
};

// Whether an integer from the Python boundary is one of CellKind's codes.
FUSEDRNN_HOST_DEVICE constexpr bool is_cell_code(int32_t code) {
  return code >= static_cast<int32_t>(CellKind::kLstm) &&
         code <= static_cast<int32_t>(CellKind::kLstmCifg);
}

// Number of gate blocks of H rows in W_ih / W_hh (and columns of the input projection).
FUSEDRNN_HOST_DEVICE constexpr int gate_count(CellKind cell) {
  return cell == CellKind::kLstm                                  ? 4
         : (cell == CellKind::kGru || cell == CellKind::kLstmCifg) ? 3
                                                                   : 1;
}

// The LSTMs (plain and CIFG): a cell state c beside h, and an optional projection (proj_size).
FUSEDRNN_HOST_DEVICE constexpr bool has_cell_state(CellKind cell) {
  return cell == CellKind::kLstm || cell == CellKind::kLstmCifg;
}

// Number of H-wide blocks per (t, b) that forward saves for backward in `gates`:
// LSTM saves i, f, g, o (post-activation), a CIFG LSTM f, g, o (i is 1 - f); GRU saves r, z, n
// (post-activation) and W_hn h + b_hn; the Elman RNN saves nothing (backward reads h_t from
// `out`).
FUSEDRNN_HOST_DEVICE constexpr int saved_gate_count(CellKind cell) {
  return (cell == CellKind::kLstm || cell == CellKind::kGru) ? 4
         : cell == CellKind::kLstmCifg                       ? 3
                                                             : 0;
}

// Bytes per element of a tensor of this dtype; 0 for a code outside the enum.
FUSEDRNN_HOST_DEVICE constexpr int64_t dtype_bytes(DType dtype) {
  return dtype == DType::kFloat32 ? 4
         : dtype == DType::kFloat64 ? 8
         : (dtype == DType::kFloat16 || dtype == DType::kBFloat16) ? 2
         : 0;
}

inline const char* cell_name(CellKind cell) {
  switch (cell) {
    case CellKind::kLstm: return "lstm";
    case CellKind::kGru: return "gru";
    case CellKind::kRnnTanh: return "rnn_tanh";
    case CellKind::kRnnRelu: return "rnn_relu";
    case CellKind::kLstmCifg: return "lstm_cifg";
  }
  return "unknown";
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace fusedrnn
