// pybind11 glue for the repeated inference call (python/fusedrnn/_inference.py): the fields of a
// layer that do not change between calls (cell, dtype, sizes, direction, weight pointers) are
// built once into FwdParams "templates", one per direction, and each call passes only what
// changes: the sequence length, the batch, the sequences and states of ALL directions, and the
// execution fields. A call then costs one pybind11 call with a dozen integers instead of a
// params struct per direction built from Python (~10 us of the ~40 us a B=1 call used to spend
// outside the kernel).
//
// Each direction has its own input projection (xproj: one [T, B, G*H] sequence per direction,
// so that the caller can run one GEMM per direction straight from the parameters, with no
// concatenated copy of W_ih to keep in sync); the other per-direction parts are found by offset,
// in the layout of _backend.forward_layer:
//   out [T, B, D*P]                       direction d in columns [d*P, (d+1)*P) (last dim dense)
//   h0, hn [D, B, P], c0, cn [D, B, H]    contiguous, direction d at d*B*X
// Inference only: the saved tensors (gates, c_seq, r_seq) stay null.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/params.h"
#include "params_binding.h"

namespace fusedrnn {

namespace prepared_detail {

// (An unknown dtype offsets by 0 bytes; validate() rejects it before anything runs.)
inline uintptr_t offset_pointer(uintptr_t base, int64_t elements, DType dtype) {
  return base == 0 ? 0 : base + static_cast<uintptr_t>(elements * dtype_bytes(dtype));
}

// The templates with this call's fields filled in (the templates themselves stay untouched).
inline std::vector<RecurrenceFwdParams> instantiate(
    std::vector<RecurrenceFwdParams> dirs, int64_t seq_len, int64_t batch,
    const std::vector<binding_detail::SeqTuple>& xproj, const binding_detail::SeqTuple& out,
    uintptr_t h0,
    uintptr_t c0, uintptr_t hn, uintptr_t cn, uintptr_t workspace, int64_t workspace_bytes,
    int64_t num_threads, int64_t cuda_stream) {
  using binding_detail::seq_from_tuple;
  if (xproj.size() != dirs.size()) {
    throw std::invalid_argument("fusedrnn: forward_prepared: xproj holds " +
                                std::to_string(xproj.size()) + " sequences for " +
                                std::to_string(dirs.size()) + " directions");
  }
  for (size_t d = 0; d < dirs.size(); ++d) {
    auto& p = dirs[d];
    const int64_t dir = static_cast<int64_t>(d);
    p.seq_len = seq_len;
    p.batch = batch;
    p.xproj = seq_from_tuple(xproj[d]);
    p.out = seq_from_tuple(out);
    p.out.data = reinterpret_cast<void*>(offset_pointer(std::get<0>(out), dir * p.state, p.dtype));
    p.h0 = reinterpret_cast<const void*>(offset_pointer(h0, dir * batch * p.state, p.dtype));
    p.c0 = reinterpret_cast<const void*>(offset_pointer(c0, dir * batch * p.hidden, p.dtype));
    p.hn = reinterpret_cast<void*>(offset_pointer(hn, dir * batch * p.state, p.dtype));
    p.cn = reinterpret_cast<void*>(offset_pointer(cn, dir * batch * p.hidden, p.dtype));
    p.gates = p.c_seq = p.r_seq = SeqTensor{};
    p.workspace = reinterpret_cast<void*>(workspace);
    p.workspace_bytes = workspace_bytes;
    p.num_threads = num_threads;
    p.cuda_stream = cuda_stream;
  }
  return dirs;
}

}  // namespace prepared_detail

// Defines forward_prepared(templates, seq_len, batch, xproj, out, h0, c0, hn, cn, workspace,
// workspace_bytes, num_threads, cuda_stream, b_hh=[]) and
// forward_prepared_workspace_bytes(templates, seq_len, batch, num_threads=1) (a CPU workspace
// sized for fewer threads than a call runs on still works, without row groups:
// csrc/cpu/recurrence_dispatch.cpp). `validate(dirs)` is the module's validate_forward,
// `bytes(dirs)` its workspace size and `run(dirs)` its forward; run is called without the GIL.
template <typename Validate, typename Bytes, typename Run>
void bind_prepared_forward(py::module_& m, Validate validate, Bytes bytes, Run run) {
  using binding_detail::SeqTuple;
  using Fwd = RecurrenceFwdParams;
  m.def(
      "forward_prepared_workspace_bytes",
      [validate, bytes](const std::vector<Fwd>& templates, int64_t seq_len, int64_t batch,
                        int64_t num_threads) {
        // Placeholder non-null sequence/state pointers: only the sizes matter here.
        const SeqTuple placeholder{64, 1, 1};
        auto dirs = prepared_detail::instantiate(
            templates, seq_len, batch, std::vector<SeqTuple>(templates.size(), placeholder),
            placeholder, 0, 0, 64, 64, 0, 0, num_threads, 0);
        validate(dirs);
        return bytes(dirs);
      },
      py::arg("templates"), py::arg("seq_len"), py::arg("batch"), py::arg("num_threads") = 1,
      "Workspace bytes forward_prepared needs for this sequence length, batch and thread count "
      "(the CPU's threads may each take rows of the batch, with a workspace of their own).");
  m.def(
      "forward_prepared",
      [validate, run](const std::vector<Fwd>& templates, int64_t seq_len, int64_t batch,
                      const std::vector<SeqTuple>& xproj, const SeqTuple& out, uintptr_t h0, uintptr_t c0,
                      uintptr_t hn, uintptr_t cn, uintptr_t workspace, int64_t workspace_bytes,
                      int64_t num_threads, int64_t cuda_stream, const std::vector<uintptr_t>& b_hh) {
        auto dirs = prepared_detail::instantiate(templates, seq_len, batch, xproj, out, h0, c0,
                                                 hn, cn, workspace, workspace_bytes, num_threads,
                                                 cuda_stream);
        // This call's bias per direction in place of the prepared b_hh (empty: keep them). The
        // caller may pass b_ih + b_hh of an LSTM or Elman layer here and leave b_ih out of xproj
        // (both only add to the pre-activations; never a GRU's, whose b_hn sits inside r * (...)).
        if (!b_hh.empty()) {
          if (b_hh.size() != dirs.size()) {
            throw std::invalid_argument("fusedrnn: forward_prepared: b_hh holds " +
                                        std::to_string(b_hh.size()) + " pointers for " +
                                        std::to_string(dirs.size()) + " directions");
          }
          for (size_t d = 0; d < dirs.size(); ++d) dirs[d].b_hh = reinterpret_cast<const void*>(b_hh[d]);
        }
        validate(dirs);
        py::gil_scoped_release release;
        run(dirs);
      },
      py::arg("templates"), py::arg("seq_len"), py::arg("batch"), py::arg("xproj"),
      py::arg("out"), py::arg("h0"), py::arg("c0"), py::arg("hn"), py::arg("cn"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("num_threads"),
      py::arg("cuda_stream"), py::arg("b_hh") = std::vector<uintptr_t>{},
      "Inference forward of one layer from per-direction templates (see "
      "csrc/bindings/prepared_forward_binding.h for the layout).");
}

}  // namespace fusedrnn
