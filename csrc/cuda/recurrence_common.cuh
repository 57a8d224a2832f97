// Pieces shared by the forward and backward persistent recurrence kernels: the kernel argument
// structs, sequence addressing with per-sequence lengths, and the grid barrier.
#pragma once

#include <cstdint>

#include "fusedrnn/params.h"
#include "launch_compat.h"
#include "recurrence_layout.h"

namespace fusedrnn::cuda {

// The single by-value argument of a kernel (passed as __grid_constant__, so that the kernel reads
// dir[blockIdx-dependent index] straight from the parameter bank instead of copying the whole
// struct to local memory). Both directions share one workspace: direction d's buffers start at
// dir[0].workspace + d * workspace.per_direction.
struct FwdKernelArgs {
  RecurrenceFwdParams dir[2];
  RecurrenceGeometry geo;
  WorkspaceLayout workspace;
};

struct BwdKernelArgs {
  RecurrenceBwdParams dir[2];
  RecurrenceGeometry geo;
  WorkspaceLayout workspace;
};

// Where batch row b is at processing step s. Steps are taken in processing order: s = 0 is the
// first step of every sequence (t = 0 forward, t = lengths[b]-1 in reverse). Valid steps form the
// prefix s < lengths[b]; a padded step maps to t = s, so over all s every t >= lengths[b] is
// visited once and gets its zero output / zero gradient row.
struct StepRow {
  int64_t t;
  int64_t length;
  bool valid;
};

__device__ __forceinline__ StepRow step_row(const RecurrenceShape& p, int64_t s, int64_t b) {
  StepRow row;
  row.length = p.lengths != nullptr ? p.lengths[b] : p.seq_len;
  row.valid = s < row.length;
  row.t = (p.reverse && row.valid) ? row.length - 1 - s : s;
  return row;
}

template <typename T>
__device__ __forceinline__ T* seq_at(const SeqTensor& s, int64_t t, int64_t b) {
  return static_cast<T*>(s.data) + t * s.stride_t + b * s.stride_b;
}

template <typename T>
__device__ __forceinline__ T* smem_at(unsigned char* smem, int64_t offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// The (batch row, unit) item a thread owns for the whole sequence when a step's items all fit the
// block's threads in one batch chunk (own items), and where its walk over a chunk's items starts.
// Own items sit on the block's LAST `count` threads (item i on thread blockDim.x - count + i), so
// that warp 0 holds none unless the block is full: its thread 0 arrives at the grid barrier for
// the block, and that arrival (a release) waits for the warp's outstanding memory accesses, while
// item threads may have loads in flight across the barrier (geo.inputs_ahead). Without own items
// every thread walks the items from its own index.
struct ItemThreads {
  int item;   // this thread's own item; negative: none
  int first;  // the first item of a chunk this thread processes (>= count: none)

  __device__ __forceinline__ ItemThreads(bool own_items, int count) {
    const int t = static_cast<int>(threadIdx.x);
    const int threads = static_cast<int>(blockDim.x);
    item = own_items ? t - (threads - count) : -1;
    first = !own_items ? t : (item >= 0 ? item : threads);
  }
  __device__ __forceinline__ bool has_item() const { return item >= 0; }
};

// One barrier across all blocks of both directions; the launch is cooperative and co-resident
// (checked by the launcher), so it cannot hang. It orders global memory: writes before it are
// visible to every block after it.
__device__ __forceinline__ void grid_barrier() { cooperative_groups::this_grid().sync(); }

// The barrier between the blocks that exchange state: the blocks of one direction (the two
// directions of a launch never read each other's buffers). With one block per direction that is
// the block's own barrier, which also makes its global writes visible to its threads; the grid's
// costs ~1 us a step on an H200 (bench/results/gpu-probe-h200-2026-11-27.md).
__device__ __forceinline__ void direction_barrier(int blocks_per_dir) {
  if (blocks_per_dir == 1) {
    __syncthreads();
    return;
  }
  grid_barrier();
}

}  // namespace fusedrnn::cuda
