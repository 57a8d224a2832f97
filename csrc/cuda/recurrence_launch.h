// Host entry points of the CUDA recurrence, one per (direction list) call, dispatched on cell and
// dtype at run time. Defined in recurrence_dispatch.cpp over the explicit instantiations of the
// per-dtype recurrence_<dtype>.cu files. Shared by the _cuda and _emu modules.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fusedrnn/params.h"
#include "recurrence_layout.h"

namespace fusedrnn::cuda {

struct LstmTraits;  // cell_traits.cuh
struct CifgTraits;
struct GruTraits;
struct RnnTraits;

// Test and tuning knobs, process-wide (the bindings expose them as _set_launch_options).
struct LaunchOptions {
  bool force_streaming = false;  // never keep weight slices in shared memory
  int max_blocks_per_dir = 0;    // cap on blocks per direction; 0 = as many as the device allows
  int max_batch_chunk = 0;       // cap on batch rows per product pass; 0 = as many as fit
  int max_stage_rows = 0;        // cap on W_hh rows per staging pass (x16); 0 = as many as fit
  bool tagged_exchange = false;  // forward: tagged words instead of a grid barrier per step
  bool inputs_ahead = false;     // owned items load the next step's inputs during the exchange
  int threads_per_block = 0;     // a multiple of 32, at most kMaxThreadsPerBlock; 0 = the default
};
LaunchOptions& launch_options();

int64_t forward_workspace_bytes(const std::vector<RecurrenceFwdParams>& dirs);
int64_t backward_workspace_bytes(const std::vector<RecurrenceBwdParams>& dirs);

// Launch on dirs[0].cuda_stream; asynchronous, allocates nothing. Throws std::invalid_argument for
// a workspace that is too small or not 16-byte aligned, std::runtime_error for a CUDA error
// (naming the kernel).
void forward(const std::vector<RecurrenceFwdParams>& dirs);
void backward(const std::vector<RecurrenceBwdParams>& dirs);

// The launch the planner picks for these params on the current device (tests, benchmarks).
RecurrenceGeometry plan_forward(const std::vector<RecurrenceFwdParams>& dirs);
RecurrenceGeometry plan_backward(const std::vector<RecurrenceBwdParams>& dirs);

// Per-cell, per-dtype launchers (recurrence_launch.cuh), explicitly instantiated per dtype.
template <class Cell, typename T>
void launch_forward(const std::vector<RecurrenceFwdParams>& dirs, RecurrenceGeometry* plan_only);
template <class Cell, typename T>
void launch_backward(const std::vector<RecurrenceBwdParams>& dirs, RecurrenceGeometry* plan_only);

}  // namespace fusedrnn::cuda
