// fusedrnn._cpu: the CPU recurrence behind the contract of python/fusedrnn/_backend.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "params_binding.h"
#include "prepared_forward_binding.h"
#include "recurrence.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedrnn CPU recurrence (one layer, 1 or 2 directions per call)";
  fusedrnn::bind_params(m);

  m.def(
      "forward",
      [](const std::vector<fusedrnn::RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, /*half_supported=*/false);
        py::gil_scoped_release release;
        fusedrnn::cpu::forward(dirs);
      },
      py::arg("directions"), "Runs the forward recurrence of one layer (list of FwdParams).");
  m.def(
      "backward",
      [](const std::vector<fusedrnn::RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, /*half_supported=*/false);
        py::gil_scoped_release release;
        fusedrnn::cpu::backward(dirs);
      },
      py::arg("directions"), "Runs the backward recurrence of one layer (list of BwdParams).");
  m.def(
      "forward_workspace_bytes",
      [](const std::vector<fusedrnn::RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, false);
        return fusedrnn::cpu::forward_workspace_bytes(dirs);
      },
      py::arg("directions"));
  m.def(
      "backward_workspace_bytes",
      [](const std::vector<fusedrnn::RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, false);
        return fusedrnn::cpu::backward_workspace_bytes(dirs);
      },
      py::arg("directions"));
  fusedrnn::bind_prepared_forward(
      m, [](const auto& dirs) { fusedrnn::validate_forward(dirs, /*half_supported=*/false); },
      [](const auto& dirs) { return fusedrnn::cpu::forward_workspace_bytes(dirs); },
      [](const auto& dirs) { fusedrnn::cpu::forward(dirs); });
  m.def("isa", &fusedrnn::cpu::active_isa,
        "The instruction set the recurrence runs with (FUSEDRNN_CPU_ISA lowers it).");
}
