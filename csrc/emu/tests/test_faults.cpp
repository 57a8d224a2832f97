// Misuse is reported as a failed launch naming the problem, never a hang: divergent barriers,
// exits while others wait, bad masks, warp/block deadlocks, grid barriers that cannot complete,
// exceptions and __trap in kernel code, static shared memory in cooperative launches. After a
// fault the emulator keeps working.
#include <stdexcept>
#include <vector>

#include <cooperative_groups.h>

#include "selftest.h"

namespace cg = cooperative_groups;

namespace {

__global__ void divergent_barrier_sites() {
  if (threadIdx.x < 4) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

TEST_CASE(fault_divergent_barrier_sites) {
  CHECK_LAUNCH_FAILS(emu::launch(divergent_barrier_sites, dim3(1), dim3(8), 0),
                     cudaErrorLaunchFailure, "divergent barrier");
}

__global__ void exit_while_others_wait() {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

TEST_CASE(fault_thread_exits_while_others_wait) {
  // Either the exit happens while some wait, or a barrier is reached after the exit.
  const cudaError_t e = emu::launch(exit_while_others_wait, dim3(1), dim3(8), 0);
  const std::string message = cudaGetErrorString(e);
  CHECK(e == cudaErrorLaunchFailure);
  CHECK(message.find("exited") != std::string::npos);
  (void)cudaGetLastError();
}

__global__ void barrier_after_exit(int* flag) {
  if (threadIdx.x == 0) {
    atomicExch(flag, 1);
    return;
  }
  while (atomicAdd(flag, 0) == 0) {
  }
  __syncthreads();
}

// The flag is set before thread 0 returns, so on a loaded machine the others can reach the barrier
// before the emulator has recorded the exit: then the exit is reported as "exited the kernel while
// N thread(s) ... wait". Both reports name the same misuse; the test accepts either.
TEST_CASE(fault_barrier_after_a_thread_exited) {
  int flag = 0;
  CHECK_LAUNCH_FAILS(emu::launch(barrier_after_exit, dim3(1), dim3(4), 0, &flag),
                     cudaErrorLaunchFailure, "exited");
}

__global__ void lane_not_in_mask(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 5, 0);
}

TEST_CASE(fault_calling_lane_not_in_mask) {
  std::vector<int> out(32);
  CHECK_LAUNCH_FAILS(emu::launch(lane_not_in_mask, dim3(1), dim3(32), 0, out.data()),
                     cudaErrorLaunchFailure, "does not include the calling lane");
}

// Lane 0 shuffles with the full mask while the others wait at __syncthreads: nobody can proceed.
__global__ void warp_block_deadlock(int* out) {
  if (threadIdx.x == 0) out[0] = __shfl_sync(0xFFFFFFFFu, 1, 0);
  __syncthreads();
}

TEST_CASE(fault_warp_and_block_deadlock) {
  int out = 0;
  CHECK_LAUNCH_FAILS(emu::launch(warp_block_deadlock, dim3(1), dim3(32), 0, &out),
                     cudaErrorLaunchFailure, "deadlock");
}

// Lanes disagree on the mask: lanes 0-15 wait for 16-31 in a full-mask shuffle, which those never
// join (they finish their own half-mask shuffle and wait at the block barrier). Had lanes 16-31
// exited instead, the full-mask shuffle would complete without them, as on the GPU, where exited
// lanes named in a mask are not waited for.
__global__ void mismatched_masks(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0xFFFFFFFFu : 0xFFFF0000u;
  out[threadIdx.x] = __shfl_sync(mask, 1, 16);
  __syncthreads();
}

TEST_CASE(fault_mismatched_masks_deadlock) {
  std::vector<int> out(32);
  CHECK_LAUNCH_FAILS(emu::launch(mismatched_masks, dim3(1), dim3(32), 0, out.data()),
                     cudaErrorLaunchFailure, "mask 0xffffffff");
}

__global__ void different_warp_intrinsics(int* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1, 1);
  } else {
    out[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, 1, 1);
  }
}

TEST_CASE(fault_different_warp_intrinsics) {
  std::vector<int> out(32);
  CHECK_LAUNCH_FAILS(emu::launch(different_warp_intrinsics, dim3(1), dim3(32), 0, out.data()),
                     cudaErrorLaunchFailure, "divergent warp operation");
}

__global__ void grid_sync_after_block_exit() {
  if (blockIdx.x == 1) return;
  cg::this_grid().sync();
}

TEST_CASE(fault_grid_sync_cannot_complete) {
  CHECK_LAUNCH_FAILS(emu::launch_cooperative(grid_sync_after_block_exit, dim3(2), dim3(4), 0),
                     cudaErrorLaunchFailure, "grid.sync()");
}

__global__ void grid_sync_in_normal_launch() { cg::this_grid().sync(); }

TEST_CASE(fault_grid_sync_needs_cooperative_launch) {
  CHECK_LAUNCH_FAILS(emu::launch(grid_sync_in_normal_launch, dim3(2), dim3(4), 0),
                     cudaErrorLaunchFailure, "not cooperative");
}

__global__ void static_shared_in_cooperative(int* out) {
  __shared__ int tile[4];
  tile[threadIdx.x] = 1;
  out[threadIdx.x] = tile[threadIdx.x];
}

TEST_CASE(fault_static_shared_in_cooperative_launch) {
  std::vector<int> out(4);
  CHECK_LAUNCH_FAILS(emu::launch_cooperative(static_shared_in_cooperative, dim3(2), dim3(4), 0,
                                             out.data()),
                     cudaErrorLaunchFailure, "static __shared__");
  // One block is fine: nothing to share the buffer with.
  CHECK_LAUNCH_OK(emu::launch_cooperative(static_shared_in_cooperative, dim3(1), dim3(4), 0,
                                          out.data()));
}

__global__ void throwing_kernel() {
  if (threadIdx.x == 2) throw std::out_of_range("index 7 of 4");
  __syncthreads();
}

TEST_CASE(fault_exception_in_kernel) {
  CHECK_LAUNCH_FAILS(emu::launch(throwing_kernel, dim3(1), dim3(4), 0), cudaErrorLaunchFailure,
                     "index 7 of 4");
}

__global__ void trapping_kernel() {
  if (blockIdx.x == 1 && threadIdx.x == 1) __trap();
}

TEST_CASE(fault_trap) {
  CHECK_LAUNCH_FAILS(emu::launch(trapping_kernel, dim3(3), dim3(2), 0), cudaErrorLaunchFailure,
                     "__trap()");
}

__global__ void bad_width(int* out) { out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, 1, 0, 12); }

TEST_CASE(fault_shuffle_width_not_power_of_two) {
  std::vector<int> out(32);
  CHECK_LAUNCH_FAILS(emu::launch(bad_width, dim3(1), dim3(32), 0, out.data()),
                     cudaErrorLaunchFailure, "power of two");
}

__global__ void healthy(int* out) {
  __syncthreads();
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

TEST_CASE(fault_emulator_recovers_after_faults) {
  CHECK_LAUNCH_FAILS(emu::launch(divergent_barrier_sites, dim3(1), dim3(8), 0),
                     cudaErrorLaunchFailure, "divergent barrier");
  std::vector<int> out(32, -1);
  CHECK_LAUNCH_OK(emu::launch(healthy, dim3(1), dim3(32), 0, out.data()));
  for (int lane = 0; lane < 32; ++lane) CHECK_EQ(out[lane], lane ^ 1);
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace

namespace {

// A thread that never reaches the barrier (here: it spins for 3 s) is reported by the watchdog
// of the threads waiting for it (set to 1 s for this test).
__global__ void late_thread() {
  if (threadIdx.x == 0) {
    const long long start = clock64();
    while (clock64() - start < 3000000000ll) __nanosleep(1000000);
  }
  __syncthreads();
}

TEST_CASE(fault_watchdog_reports_a_hang) {
  const double saved = emu::device_config().watchdog_seconds;
  emu::device_config().watchdog_seconds = 1.0;
  CHECK_LAUNCH_FAILS(emu::launch(late_thread, dim3(1), dim3(4), 0), cudaErrorLaunchFailure,
                     "watchdog");
  emu::device_config().watchdog_seconds = saved;
}

}  // namespace
