// cooperative_groups for the CPU emulator: grid_group (grid-wide barrier of a cooperative
// launch), thread_block and thread_block_tile<N> (warp tiles: shuffles, votes, sync).
#pragma once

#include <source_location>

#include "cuda_emu.h"

namespace cooperative_groups {

class grid_group {
 public:
  // Every thread of the grid must call it; only valid in a cooperative launch
  // (emu::launch_cooperative / cudaLaunchCooperativeKernel), otherwise the launch faults.
  void sync(const std::source_location loc = std::source_location::current()) const {
    emu::detail::block_barrier(emu::detail::BarrierKind::kGrid, 0, "grid.sync()", loc);
  }
  bool is_valid() const {
    const auto* launch = emu::detail::tls_context.launch;
    return launch != nullptr && launch->cooperative;
  }
  unsigned long long num_threads() const { return num_blocks() * threads_per_block(); }
  unsigned long long size() const { return num_threads(); }
  unsigned long long thread_rank() const {
    return block_rank() * threads_per_block() + static_cast<unsigned long long>(
                                                    emu::detail::tls_context.tid);
  }
  unsigned long long num_blocks() const { return 1ull * gridDim.x * gridDim.y * gridDim.z; }
  unsigned long long block_rank() const {
    return blockIdx.x + 1ull * gridDim.x * (blockIdx.y + 1ull * gridDim.y * blockIdx.z);
  }
  dim3 dim_blocks() const { return gridDim; }
  dim3 block_index() const { return blockIdx; }

 private:
  static unsigned long long threads_per_block() {
    return 1ull * blockDim.x * blockDim.y * blockDim.z;
  }
};
inline grid_group this_grid() { return grid_group{}; }

class thread_block {
 public:
  void sync(const std::source_location loc = std::source_location::current()) const {
    emu::detail::block_barrier(emu::detail::BarrierKind::kSync, 0, "thread_block::sync()", loc);
  }
  unsigned thread_rank() const { return static_cast<unsigned>(emu::detail::tls_context.tid); }
  unsigned num_threads() const { return blockDim.x * blockDim.y * blockDim.z; }
  unsigned size() const { return num_threads(); }
  dim3 group_index() const { return blockIdx; }
  dim3 thread_index() const { return threadIdx; }
  dim3 dim_threads() const { return blockDim; }
  dim3 group_dim() const { return blockDim; }
};
inline thread_block this_thread_block() { return thread_block{}; }
inline void sync(const thread_block& block,
                 const std::source_location loc = std::source_location::current()) {
  block.sync(loc);
}
inline void sync(const grid_group& grid,
                 const std::source_location loc = std::source_location::current()) {
  grid.sync(loc);
}

// A tile of N consecutive threads (N a power of two <= 32) inside one warp.
template <unsigned N>
class thread_block_tile {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0,
                "thread_block_tile size must be a power of two <= 32");

 public:
  static constexpr unsigned num_threads() { return N; }
  static constexpr unsigned size() { return N; }
  unsigned thread_rank() const { return lane() % N; }
  unsigned meta_group_rank() const {
    return static_cast<unsigned>(emu::detail::tls_context.tid) / N;
  }
  unsigned meta_group_size() const {
    return (blockDim.x * blockDim.y * blockDim.z + N - 1) / N;
  }
  // The lanes of this tile within the warp, as the GPU's tile masks.
  unsigned mask() const {
    return N == 32 ? 0xFFFFFFFFu : (((1u << N) - 1u) << (lane() / N * N));
  }

  void sync(const std::source_location loc = std::source_location::current()) const {
    __syncwarp(mask(), loc);
  }
  template <class T>
  T shfl(T var, int src_rank,
         const std::source_location loc = std::source_location::current()) const {
    return __shfl_sync(mask(), var, src_rank, static_cast<int>(N), loc);
  }
  template <class T>
  T shfl_down(T var, unsigned delta,
              const std::source_location loc = std::source_location::current()) const {
    return __shfl_down_sync(mask(), var, delta, static_cast<int>(N), loc);
  }
  template <class T>
  T shfl_up(T var, unsigned delta,
            const std::source_location loc = std::source_location::current()) const {
    return __shfl_up_sync(mask(), var, delta, static_cast<int>(N), loc);
  }
  template <class T>
  T shfl_xor(T var, unsigned lane_mask,
             const std::source_location loc = std::source_location::current()) const {
    return __shfl_xor_sync(mask(), var, static_cast<int>(lane_mask), static_cast<int>(N), loc);
  }
  int any(int predicate, const std::source_location loc = std::source_location::current()) const {
    return __any_sync(mask(), predicate, loc);
  }
  int all(int predicate, const std::source_location loc = std::source_location::current()) const {
    return __all_sync(mask(), predicate, loc);
  }
  // Bits relative to the tile (bit i = tile rank i), as on the GPU.
  unsigned ballot(int predicate,
                  const std::source_location loc = std::source_location::current()) const {
    const unsigned bits = __ballot_sync(mask(), predicate, loc);
    return N == 32 ? bits : (bits >> (lane() / N * N)) & ((1u << N) - 1u);
  }

 private:
  static unsigned lane() { return static_cast<unsigned>(emu::detail::tls_context.lane); }
};

template <unsigned N, class Parent>
inline thread_block_tile<N> tiled_partition(const Parent&) {
  return thread_block_tile<N>{};
}

}  // namespace cooperative_groups
