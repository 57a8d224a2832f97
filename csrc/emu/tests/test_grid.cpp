// Cooperative launches: grid.sync() across concurrently running blocks, per-block dynamic shared
// memory, cooperative_groups blocks and tiles, and the runtime-API launch paths.
#include <numeric>
#include <vector>

#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>

#include "selftest.h"

namespace cg = cooperative_groups;

namespace {

struct ReduceArgs {
  const int* in;
  int* partials;  // one per block
  int* totals;    // one per thread per round
  int rounds;
};

// Each round: every block reduces its slice into partials[block], grid.sync(), every thread sums
// all partials. Repeated rounds exercise the reuse of the grid barrier.
__global__ void grid_reduction(ReduceArgs args) {
  cg::grid_group grid = cg::this_grid();
  cg::thread_block block = cg::this_thread_block();
  int* smem = reinterpret_cast<int*>(emu::dynamic_shared_memory());
  const int tid = block.thread_rank();
  const int threads = block.size();
  for (int round = 0; round < args.rounds; ++round) {
    smem[tid] = args.in[blockIdx.x * threads + tid] * (round + 1);
    block.sync();
    if (tid == 0) {
      int sum = 0;
      for (int i = 0; i < threads; ++i) sum += smem[i];
      args.partials[blockIdx.x] = sum;
    }
    grid.sync();
    int total = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) total += args.partials[b];
    args.totals[round * grid.size() + grid.thread_rank()] = total;
    grid.sync();  // partials are rewritten next round
  }
}

TEST_CASE(grid_sync_reduction_across_blocks) {
  const int blocks = 4, threads = 16, rounds = 3;
  std::vector<int> in(blocks * threads), partials(blocks, 0), totals(rounds * blocks * threads, 0);
  std::iota(in.begin(), in.end(), 1);
  const int base = std::accumulate(in.begin(), in.end(), 0);
  ReduceArgs args{in.data(), partials.data(), totals.data(), rounds};
  CHECK_LAUNCH_OK(emu::launch_cooperative(grid_reduction, dim3(blocks), dim3(threads),
                                          threads * sizeof(int), args));
  for (int round = 0; round < rounds; ++round)
    for (int t = 0; t < blocks * threads; ++t) CHECK_EQ(totals[round * blocks * threads + t], base * (round + 1));
}

// Every block of a cooperative launch has its own dynamic shared memory.
__global__ void smem_private_per_block(int* ok) {
  int* smem = reinterpret_cast<int*>(emu::dynamic_shared_memory());
  if (threadIdx.x == 0) smem[0] = static_cast<int>(blockIdx.x) + 1;
  cg::this_grid().sync();
  if (threadIdx.x == 0 && smem[0] != static_cast<int>(blockIdx.x) + 1) *ok = 0;
}

TEST_CASE(grid_dynamic_smem_private_per_block) {
  int ok = 1;
  CHECK_LAUNCH_OK(emu::launch_cooperative(smem_private_per_block, dim3(3), dim3(4), 64, &ok));
  CHECK_EQ(ok, 1);
}

__global__ void grid_queries(unsigned long long* out) {
  cg::grid_group grid = cg::this_grid();
  const unsigned long long rank = grid.thread_rank();
  out[rank * 4 + 0] = grid.size();
  out[rank * 4 + 1] = grid.num_blocks();
  out[rank * 4 + 2] = grid.block_rank();
  out[rank * 4 + 3] = grid.is_valid();
}

TEST_CASE(grid_group_queries) {
  const dim3 grid(2, 2), block(3, 2);
  std::vector<unsigned long long> out(24 * 4, 99);
  CHECK_LAUNCH_OK(emu::launch_cooperative(grid_queries, grid, block, 0, out.data()));
  for (int rank = 0; rank < 24; ++rank) {
    CHECK_EQ(out[rank * 4 + 0], 24ull);
    CHECK_EQ(out[rank * 4 + 1], 4ull);
    CHECK_EQ(out[rank * 4 + 2], static_cast<unsigned long long>(rank / 6));
    CHECK_EQ(out[rank * 4 + 3], 1ull);
  }
}

__global__ void tiles(int* out) {
  cg::thread_block block = cg::this_thread_block();
  cg::thread_block_tile<8> tile = cg::tiled_partition<8>(block);
  const int rank = static_cast<int>(block.thread_rank());
  int* row = out + rank * 5;
  row[0] = cg::reduce(tile, rank, cg::plus<int>());
  row[1] = static_cast<int>(tile.ballot(tile.thread_rank() % 2 == 1));
  row[2] = tile.shfl(rank, 3);
  row[3] = tile.shfl_down(rank, 2);
  tile.sync();
  row[4] = static_cast<int>(tile.meta_group_rank());
  cg::thread_block_tile<32> warp = cg::tiled_partition<32>(block);
  (void)warp.any(1);
}

TEST_CASE(grid_tiled_partition_8) {
  std::vector<int> out(64 * 5, 0);
  CHECK_LAUNCH_OK(emu::launch(tiles, dim3(1), dim3(64), 0, out.data()));
  for (int rank = 0; rank < 64; ++rank) {
    const int base = rank / 8 * 8;
    CHECK_EQ(out[rank * 5 + 0], 8 * base + 28);
    CHECK_EQ(out[rank * 5 + 1], 0xAA);
    CHECK_EQ(out[rank * 5 + 2], base + 3);
    CHECK_EQ(out[rank * 5 + 3], rank % 8 + 2 < 8 ? rank + 2 : rank);
    CHECK_EQ(out[rank * 5 + 4], rank / 8);
  }
}

struct PairArgs {
  int* out;
  int value;
};

__global__ void two_params(PairArgs args, int extra) {
  cg::this_grid().sync();
  args.out[blockIdx.x * blockDim.x + threadIdx.x] = args.value + extra;
}

TEST_CASE(grid_runtime_api_launches) {
  std::vector<int> out(8, 0);
  PairArgs args{out.data(), 40};
  int extra = 2;
  void* params[] = {&args, &extra};
  CHECK_LAUNCH_OK(cudaLaunchCooperativeKernel(two_params, dim3(2), dim3(4), params, 0, nullptr));
  for (int v : out) CHECK_EQ(v, 42);
  CHECK_LAUNCH_FAILS(cudaLaunchKernel(two_params, dim3(2), dim3(4), params, 0, nullptr),
                     cudaErrorLaunchFailure, "not cooperative");
}

}  // namespace
