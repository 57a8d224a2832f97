// The pybind11 module of the CUDA recurrence. One source, two modules:
//   _cuda  kernels compiled by nvcc, pointers are CUDA device memory, launches are asynchronous on
//          the params' cuda_stream;
//   _emu   the same kernel sources compiled by g++ against csrc/emu (FUSEDRNN_EMULATED_CUDA), run
//          on CPU threads over host memory; test-only.
// Both expose what python/fusedrnn/_backend.py calls: FwdParams, BwdParams, forward, backward,
// forward_workspace_bytes, backward_workspace_bytes, forward_prepared (+ its workspace bytes);
// plus test knobs _set_launch_options and _launch_plan.
// First: with the emulator it defines __host__/__device__, which the core headers use.
#include "launch_compat.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fusedrnn/params.h"
#include "params_binding.h"
#include "prepared_forward_binding.h"
#include "recurrence_launch.h"

#ifndef FUSEDRNN_MODULE_NAME
#define FUSEDRNN_MODULE_NAME _cuda
#endif

namespace py = pybind11;

namespace {

py::dict plan_to_dict(const fusedrnn::cuda::RecurrenceGeometry& g) {
  py::dict d;
  d["num_dirs"] = g.num_dirs;
  d["blocks_per_dir"] = g.blocks_per_dir;
  d["threads"] = g.threads;
  d["units_per_block"] = g.units_per_block;
  d["cols_per_block"] = g.cols_per_block;
  d["batch_chunk"] = g.batch_chunk;
  d["weights_in_smem"] = g.weights_in_smem;
  d["stage_rows"] = py::make_tuple(g.stage_rows[0], g.stage_rows[1]);
  d["tagged_exchange"] = g.tagged_exchange;
  d["inputs_ahead"] = g.inputs_ahead;
  d["smem_bytes"] = g.smem_bytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(FUSEDRNN_MODULE_NAME, m) {
  using fusedrnn::RecurrenceBwdParams;
  using fusedrnn::RecurrenceFwdParams;
  namespace cu = fusedrnn::cuda;
#if defined(FUSEDRNN_EMULATED_CUDA)
  m.doc() = "fusedrnn CUDA recurrence kernels run by the CPU emulator (test-only)";
  m.attr("BACKEND") = "emu";
#else
  m.doc() = "fusedrnn persistent CUDA recurrence kernels";
  m.attr("BACKEND") = "cuda";
#endif
  fusedrnn::bind_params(m);

  m.def(
      "forward_workspace_bytes",
      [](const std::vector<RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, fusedrnn::kEveryDType);
        return cu::forward_workspace_bytes(dirs);
      },
      py::arg("dirs"), "Workspace bytes forward needs for these directions.");
  m.def(
      "backward_workspace_bytes",
      [](const std::vector<RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, fusedrnn::kEveryDType);
        return cu::backward_workspace_bytes(dirs);
      },
      py::arg("dirs"), "Workspace bytes backward needs for these directions.");
  m.def(
      "forward",
      [](const std::vector<RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, fusedrnn::kEveryDType);
        py::gil_scoped_release release;
        cu::forward(dirs);
      },
      py::arg("dirs"), "Runs the forward recurrence of one layer (1 or 2 directions).");
  m.def(
      "backward",
      [](const std::vector<RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, fusedrnn::kEveryDType);
        py::gil_scoped_release release;
        cu::backward(dirs);
      },
      py::arg("dirs"), "Runs the backward recurrence of one layer (1 or 2 directions).");

  fusedrnn::bind_prepared_forward(
      m, [](const auto& dirs) { fusedrnn::validate_forward(dirs, fusedrnn::kEveryDType); },
      [](const auto& dirs) { return cu::forward_workspace_bytes(dirs); },
      [](const auto& dirs) { cu::forward(dirs); });

  m.def(
      "_set_launch_options",
      [](bool force_streaming, int max_blocks_per_direction, int max_batch_chunk,
         int max_stage_rows, bool tagged_exchange, bool inputs_ahead, int threads_per_block) {
        if (max_blocks_per_direction < 0 || max_batch_chunk < 0 || max_stage_rows < 0) {
          throw std::invalid_argument("fusedrnn: launch option caps must be >= 0 (0 = no cap)");
        }
        if (threads_per_block < 0 || threads_per_block % 32 != 0 ||
            threads_per_block > cu::kMaxThreadsPerBlock) {
          throw std::invalid_argument(
              "fusedrnn: threads_per_block must be a multiple of 32 up to " +
              std::to_string(cu::kMaxThreadsPerBlock) + " (0 = the default), got " +
              std::to_string(threads_per_block));
        }
        cu::launch_options().force_streaming = force_streaming;
        cu::launch_options().max_blocks_per_dir = max_blocks_per_direction;
        cu::launch_options().max_batch_chunk = max_batch_chunk;
        cu::launch_options().max_stage_rows = max_stage_rows;
        cu::launch_options().tagged_exchange = tagged_exchange;
        cu::launch_options().inputs_ahead = inputs_ahead;
        cu::launch_options().threads_per_block = threads_per_block;
      },
      py::arg("force_streaming") = false, py::arg("max_blocks_per_direction") = 0,
      py::arg("max_batch_chunk") = 0, py::arg("max_stage_rows") = 0,
      py::arg("tagged_exchange") = false, py::arg("inputs_ahead") = false,
      py::arg("threads_per_block") = 0,
      "Test knob: stream the weights instead of keeping them in shared memory, cap the blocks per "
      "direction, the batch rows per product pass and the W_hh rows per staging pass of streamed "
      "16-bit weights (forward: gate rows; backward: K rows; rounded up to 16) (0 = no cap beyond "
      "the device's); tagged_exchange: a forward "
      "without projection exchanges h as tagged words instead of a grid barrier per step; "
      "inputs_ahead: a thread that owns one (batch row, unit) loads the next step's inputs right "
      "after its cell update instead of at the start of the step; threads_per_block: a multiple "
      "of 32 up to 256 (0 = the build's: 256 on a GPU, 32 in the emulator).");
  m.def("_launch_options", []() {
    py::dict d;
    d["force_streaming"] = cu::launch_options().force_streaming;
    d["max_blocks_per_direction"] = cu::launch_options().max_blocks_per_dir;
    d["max_batch_chunk"] = cu::launch_options().max_batch_chunk;
    d["max_stage_rows"] = cu::launch_options().max_stage_rows;
    d["tagged_exchange"] = cu::launch_options().tagged_exchange;
    d["inputs_ahead"] = cu::launch_options().inputs_ahead;
    d["threads_per_block"] = cu::launch_options().threads_per_block;
    return d;
  });
  m.def(
      "_launch_plan",
      [](const std::vector<RecurrenceFwdParams>& dirs) {
        fusedrnn::validate_forward(dirs, fusedrnn::kEveryDType);
        return plan_to_dict(cu::plan_forward(dirs));
      },
      py::arg("dirs"), "The grid and shared-memory plan forward would launch.");
  m.def(
      "_launch_plan_backward",
      [](const std::vector<RecurrenceBwdParams>& dirs) {
        fusedrnn::validate_backward(dirs, fusedrnn::kEveryDType);
        return plan_to_dict(cu::plan_backward(dirs));
      },
      py::arg("dirs"), "The grid and shared-memory plan backward would launch.");
}
