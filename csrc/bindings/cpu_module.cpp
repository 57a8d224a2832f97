// fusedrnn._cpu: the CPU recurrence behind the contract of python/fusedrnn/_backend.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "params_binding.h"
#include "prepared_forward_binding.h"
#include "recurrence.h"

namespace py = pybind11;

namespace {

void* as_ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

void set_cell_step_shape(fusedrnn::CellStepShape& p, int32_t cell, int32_t dtype, int64_t batch,
                         int64_t hidden) {
  p.cell = static_cast<fusedrnn::CellKind>(cell);
  p.dtype = static_cast<fusedrnn::DType>(dtype);
  p.batch = batch;
  p.hidden = hidden;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedrnn CPU recurrence (one layer, 1 or 2 directions per call)";
  fusedrnn::bind_params(m);

  m.def(
      "forward",
      [](const std::vector<fusedrnn::RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, fusedrnn::kCpuDTypes);
        py::gil_scoped_release release;
        fusedrnn::cpu::forward(dirs);
      },
      py::arg("directions"), "Runs the forward recurrence of one layer (list of FwdParams).");
  m.def(
      "backward",
      [](const std::vector<fusedrnn::RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, fusedrnn::kCpuDTypes);
        py::gil_scoped_release release;
        fusedrnn::cpu::backward(dirs);
      },
      py::arg("directions"), "Runs the backward recurrence of one layer (list of BwdParams).");
  m.def(
      "forward_workspace_bytes",
      [](const std::vector<fusedrnn::RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, fusedrnn::kCpuDTypes);
        return fusedrnn::cpu::forward_workspace_bytes(dirs);
      },
      py::arg("directions"));
  m.def(
      "backward_workspace_bytes",
      [](const std::vector<fusedrnn::RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, fusedrnn::kCpuDTypes);
        return fusedrnn::cpu::backward_workspace_bytes(dirs);
      },
      py::arg("directions"));
  fusedrnn::bind_prepared_forward(
      m, [](const auto& dirs) { fusedrnn::validate_forward(dirs, fusedrnn::kCpuDTypes); },
      [](const auto& dirs) { return fusedrnn::cpu::forward_workspace_bytes(dirs); },
      [](const auto& dirs) { fusedrnn::cpu::forward(dirs); });
  // The pointwise cell step: pointers as ints (0 = null), as in the params classes; positional
  // arguments only, because a cell step is a few microseconds and keyword parsing is not free.
  m.def(
      "cell_step_forward",
      [](int32_t cell, int32_t dtype, int64_t batch, int64_t hidden, uintptr_t xpre, uintptr_t hpre,
         uintptr_t b_ih, uintptr_t b_hh, uintptr_t h_prev, uintptr_t c_prev, uintptr_t h,
         uintptr_t c, uintptr_t gates, uintptr_t saved_state, int64_t num_threads, uintptr_t x,
         uintptr_t w_ih, uintptr_t w_hh, int64_t input_size, int64_t state, uintptr_t peephole) {
        fusedrnn::CellStepFwdParams p;
        set_cell_step_shape(p, cell, dtype, batch, hidden);
        p.xpre = as_ptr(xpre);
        p.hpre = as_ptr(hpre);
        p.x = as_ptr(x);
        p.w_ih = as_ptr(w_ih);
        p.w_hh = as_ptr(w_hh);
        p.input_size = input_size;
        p.state = state;
        p.b_ih = as_ptr(b_ih);
        p.b_hh = as_ptr(b_hh);
        p.h_prev = as_ptr(h_prev);
        p.c_prev = as_ptr(c_prev);
        p.h = as_ptr(h);
        p.c = as_ptr(c);
        p.gates = as_ptr(gates);
        p.saved_state = as_ptr(saved_state);
        p.peephole = as_ptr(peephole);
        p.num_threads = num_threads;
        py::gil_scoped_release release;
        fusedrnn::cpu::cell_step_forward(p);
      },
      "One pointwise cell step (fusedrnn/cell_step_params.h): on formed pre-activations, or\n"
      "with xpre = 0 forming them from x, w_ih, w_hh, h_prev (the five arguments before\n"
      "peephole, an LSTM's peephole weights or 0).");
  m.def(
      "cell_step_backward",
      [](int32_t cell, int32_t dtype, int64_t batch, int64_t hidden, uintptr_t gates, uintptr_t c,
         uintptr_t c_prev, uintptr_t h_prev, uintptr_t h, uintptr_t d_h, uintptr_t d_c,
         uintptr_t d_xpre, uintptr_t d_hpre, uintptr_t d_c_prev, uintptr_t d_h_prev,
         int64_t num_threads, uintptr_t peephole) {
        fusedrnn::CellStepBwdParams p;
        set_cell_step_shape(p, cell, dtype, batch, hidden);
        p.gates = as_ptr(gates);
        p.c = as_ptr(c);
        p.c_prev = as_ptr(c_prev);
        p.h_prev = as_ptr(h_prev);
        p.h = as_ptr(h);
        p.d_h = as_ptr(d_h);
        p.d_c = as_ptr(d_c);
        p.d_xpre = as_ptr(d_xpre);
        p.d_hpre = as_ptr(d_hpre);
        p.d_c_prev = as_ptr(d_c_prev);
        p.d_h_prev = as_ptr(d_h_prev);
        p.peephole = as_ptr(peephole);
        p.num_threads = num_threads;
        py::gil_scoped_release release;
        fusedrnn::cpu::cell_step_backward(p);
      },
      "The backward of one pointwise cell step (fusedrnn/cell_step_params.h).");
  m.def("isa", &fusedrnn::cpu::active_isa,
        "The instruction set the recurrence runs with (FUSEDRNN_CPU_ISA lowers it).");
}
