// The launcher template of the persistent recurrence kernels: plans the grid from the device's SM
// count, shared memory and occupancy, and launches cooperatively, so an impossible grid is a launch
// error, never a hang. Included only by the per-dtype instantiation files.
#pragma once

#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "dtype_traits.cuh"
#include "recurrence_bwd_kernel.cuh"
#include "recurrence_fwd_kernel.cuh"
#include "recurrence_launch.h"
#include "recurrence_plan.h"

namespace fusedrnn::cuda {

namespace launch_detail {

// Makes the device that owns the weights current for the launch (torch does not switch devices
// for us) and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* device_ptr) {
#if !defined(FUSEDRNN_EMULATED_CUDA)
    cudaPointerAttributes attr{};
    FUSEDRNN_CUDA_CHECK(cudaPointerGetAttributes(&attr, device_ptr), "cudaPointerGetAttributes(w_hh)");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      throw std::invalid_argument("fusedrnn: w_hh is not CUDA device memory");
    }
    FUSEDRNN_CUDA_CHECK(cudaGetDevice(&previous_), "cudaGetDevice");
    device_ = attr.device;
    if (device_ != previous_) FUSEDRNN_CUDA_CHECK(cudaSetDevice(device_), "cudaSetDevice");
#else
    (void)device_ptr;
#endif
  }
  ~DeviceGuard() {
    if (device_ != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int device() const { return device_; }

 private:
  int device_ = 0;
  int previous_ = 0;
};

struct DeviceLimits {
  int sm_count = 0;
  int64_t max_smem_per_block = 0;
};

// The launcher's per-process caches and the functions that use them. In an unnamed namespace
// (internal linkage, also not interposable across modules): a function-local
// static of an inline function is one STB_GNU_UNIQUE object for the whole process, shared by every
// module built from this header (_cuda and _emu load together in one test process), so _emu's fake
// device limits would reach _cuda's plans, one module's "configured" mark would skip the other's
// cudaFuncSetAttribute, and two builds of different versions would even share one object.
namespace {
struct LaunchCaches {
  static constexpr int kMaxDevices = 64;
  std::mutex mutex;
  DeviceLimits limits[kMaxDevices];
  std::set<std::pair<const void*, int>> smem_configured;  // (kernel, device)
};
LaunchCaches& launch_caches() {
  static LaunchCaches caches;
  return caches;
}

inline DeviceLimits device_limits(int device) {
  constexpr int kMaxDevices = LaunchCaches::kMaxDevices;
  LaunchCaches& caches = launch_caches();
  DeviceLimits* cache = caches.limits;
  std::lock_guard<std::mutex> lock(caches.mutex);
  if (device >= 0 && device < kMaxDevices && cache[device].sm_count > 0) return cache[device];
  DeviceLimits limits;
  int optin = 0;
  FUSEDRNN_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device),
                      "cudaDeviceGetAttribute(MultiProcessorCount)");
  FUSEDRNN_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
      "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  limits.max_smem_per_block = optin;
  if (device >= 0 && device < kMaxDevices) cache[device] = limits;
  return limits;
}

// Raises a kernel's dynamic shared memory limit to the device maximum, once per kernel and
// device. Keyed by the kernel's address: every forward kernel has the same type (as has every
// backward kernel), so a static per template instance would configure only the first one launched.
template <typename Kernel>
void allow_max_smem(Kernel* kernel, int device, int64_t max_smem, const std::string& name) {
  LaunchCaches& caches = launch_caches();
  std::set<std::pair<const void*, int>>& configured = caches.smem_configured;
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  std::lock_guard<std::mutex> lock(caches.mutex);
  if (configured.count(key) != 0) return;
  FUSEDRNN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(max_smem)),
                      ("cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for " + name).c_str());
  configured.insert(key);
}
}  // namespace

// Whether every weight row a launch streams starts on 16 bytes, as staged streaming's cp.async
// needs: W_hh rows (K = P) and, projected, W_hr rows (K = H). (The K-staged backward copies
// 16-byte pieces of W_hh rows; the plan makes them start on 16 bytes within a row.)
template <typename Params>
bool weight_rows_16_byte_aligned(const std::vector<Params>& dirs, int64_t elem_bytes) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  for (const Params& p : dirs) {
    const bool projected = has_cell_state(p.cell) && p.state != p.hidden;
    if (!aligned(p.w_hh) || (projected && !aligned(p.w_hr)) ||
        !weight_rows_are_vectors(p.state, p.hidden, projected, elem_bytes)) {
      return false;
    }
  }
  return true;
}

inline std::string kernel_name(const char* base, CellKind cell, DType dtype, bool smem) {
  return std::string(base) + "<" + cell_name(cell) + ", " + dtype_name(dtype) + ", " +
         (smem ? "weights in shared memory" : "streamed weights") + ">";
}

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kFloat32;
  else if constexpr (std::is_same_v<T, double>) return DType::kFloat64;
  else if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  else return DType::kBFloat16;
}

// Plans and (unless plan_only) launches one persistent kernel for `dirs`.
template <typename T, typename Args, typename Params, typename Kernel>
void launch_persistent(const std::vector<Params>& dirs, bool backward, Kernel* smem_kernel,
                       Kernel* streaming_kernel, const char* base_name,
                       RecurrenceGeometry* plan_only) {
  const Params& first = dirs.front();
  const int num_dirs = static_cast<int>(dirs.size());
  DeviceGuard guard(first.w_hh);
  const DeviceLimits limits = device_limits(guard.device());
  const std::string smem_name = kernel_name(base_name, first.cell, dtype_of<T>(), true);
  const std::string streaming_name = kernel_name(base_name, first.cell, dtype_of<T>(), false);
  allow_max_smem(smem_kernel, guard.device(), limits.max_smem_per_block, smem_name);
  allow_max_smem(streaming_kernel, guard.device(), limits.max_smem_per_block, streaming_name);

  PlanInput in;
  in.backward = backward;
  in.cell = first.cell;
  in.batch = first.batch;
  in.hidden = first.hidden;
  in.state = first.state;
  in.num_dirs = num_dirs;
  in.elem_bytes = sizeof(T);
  in.acc_bytes = sizeof(Acc<T>);
  in.sm_count = limits.sm_count;
  in.max_smem_per_block = limits.max_smem_per_block;
  in.force_streaming = launch_options().force_streaming;
  in.max_blocks_per_dir = launch_options().max_blocks_per_dir;
  in.max_batch_chunk = launch_options().max_batch_chunk;
  in.max_stage_rows = launch_options().max_stage_rows;
  in.tagged_exchange = launch_options().tagged_exchange;
  in.inputs_ahead = launch_options().inputs_ahead;
  if (launch_options().threads_per_block > 0) in.threads = launch_options().threads_per_block;
  in.stageable = weight_rows_16_byte_aligned(dirs, sizeof(T));
  const RecurrenceGeometry geo = plan_recurrence(in, [&](bool smem, int64_t bytes) {
    int blocks = 0;
    FUSEDRNN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                            &blocks, smem ? smem_kernel : streaming_kernel, in.threads,
                            static_cast<size_t>(bytes)),
                        ("cudaOccupancyMaxActiveBlocksPerMultiprocessor for " +
                         (smem ? smem_name : streaming_name)).c_str());
    return blocks;
  });
  if (plan_only != nullptr) {
    *plan_only = geo;
    return;
  }

  Args args{};
  args.dir[0] = dirs[0];
  args.dir[1] = dirs[num_dirs - 1];
  args.geo = geo;
  args.workspace = make_workspace_layout(backward, first.cell, first.batch, first.hidden,
                                         first.state, sizeof(T), sizeof(Acc<T>));
  const int64_t needed = args.workspace.per_direction * num_dirs;
  // The workspace holds the exchange's 8-byte tagged words, fp32/fp64 state arrays and (in the
  // K-staged backward) rows copied with 16-byte cp.async: a misaligned base is a sticky
  // misaligned-address fault on a GPU, which x86 (and so the emulator) tolerates. torch's
  // allocations are aligned to 256 bytes; a C++ caller's might not be.
  if (needed > 0 && reinterpret_cast<uintptr_t>(first.workspace) % 16 != 0) {
    throw std::invalid_argument("fusedrnn: workspace must be 16-byte aligned");
  }
  for (const Params& p : dirs) {
    if (p.workspace_bytes < needed || (needed > 0 && p.workspace != dirs[0].workspace)) {
      throw std::invalid_argument(
          "fusedrnn: workspace must be one buffer of at least " + std::to_string(needed) +
          " bytes shared by all directions (from *_workspace_bytes), got " +
          std::to_string(p.workspace_bytes) + " bytes");
    }
  }
  const std::string& name = geo.weights_in_smem ? smem_name : streaming_name;
  void* kernel_args[] = {&args};
  FUSEDRNN_CUDA_CHECK(
      cudaLaunchCooperativeKernel(geo.weights_in_smem ? smem_kernel : streaming_kernel,
                                  dim3(static_cast<unsigned>(geo.blocks_per_dir * num_dirs)),
                                  dim3(static_cast<unsigned>(geo.threads)), kernel_args,
                                  static_cast<size_t>(geo.smem_bytes),
                                  reinterpret_cast<cudaStream_t>(first.cuda_stream)),
      ("launch of " + name).c_str());
}

}  // namespace launch_detail

template <class Cell, typename T>
void launch_forward(const std::vector<RecurrenceFwdParams>& dirs, RecurrenceGeometry* plan_only) {
  launch_detail::launch_persistent<T, FwdKernelArgs>(
      dirs, false, &recurrence_forward_kernel<Cell, T, true>,
      &recurrence_forward_kernel<Cell, T, false>, "recurrence_forward_kernel", plan_only);
}

template <class Cell, typename T>
void launch_backward(const std::vector<RecurrenceBwdParams>& dirs, RecurrenceGeometry* plan_only) {
  launch_detail::launch_persistent<T, BwdKernelArgs>(
      dirs, true, &recurrence_backward_kernel<Cell, T, true>,
      &recurrence_backward_kernel<Cell, T, false>, "recurrence_backward_kernel", plan_only);
}

// Explicit instantiation of both launchers of every cell for one dtype.
#define FUSEDRNN_INSTANTIATE_RECURRENCE(T)                                                        \
  template void launch_forward<LstmTraits, T>(const std::vector<RecurrenceFwdParams>&,           \
                                              RecurrenceGeometry*);                              \
  template void launch_forward<CifgTraits, T>(const std::vector<RecurrenceFwdParams>&,           \
                                              RecurrenceGeometry*);                              \
  template void launch_forward<GruTraits, T>(const std::vector<RecurrenceFwdParams>&,            \
                                             RecurrenceGeometry*);                               \
  template void launch_forward<RnnTraits, T>(const std::vector<RecurrenceFwdParams>&,            \
                                             RecurrenceGeometry*);                               \
  template void launch_backward<LstmTraits, T>(const std::vector<RecurrenceBwdParams>&,          \
                                               RecurrenceGeometry*);                             \
  template void launch_backward<CifgTraits, T>(const std::vector<RecurrenceBwdParams>&,          \
                                               RecurrenceGeometry*);                             \
  template void launch_backward<GruTraits, T>(const std::vector<RecurrenceBwdParams>&,           \
                                              RecurrenceGeometry*);                              \
  template void launch_backward<RnnTraits, T>(const std::vector<RecurrenceBwdParams>&,           \
                                              RecurrenceGeometry*);

}  // namespace fusedrnn::cuda
