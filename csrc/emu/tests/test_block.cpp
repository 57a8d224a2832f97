// Block-level behaviour: built-in indices, __syncthreads (and its count/and/or forms), static and
// dynamic shared memory in sequential launches.
#include <vector>

#include "selftest.h"

namespace {

__global__ void write_indices(int* out) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  out[bid * threads + tid] = bid * 1000 + tid;
}

TEST_CASE(block_builtin_indices_3d) {
  const dim3 grid(2, 2, 1), block(3, 2, 2);
  std::vector<int> out(4 * 12, -1);
  CHECK_LAUNCH_OK(emu::launch(write_indices, grid, block, 0, out.data()));
  for (int b = 0; b < 4; ++b)
    for (int t = 0; t < 12; ++t) CHECK_EQ(out[b * 12 + t], b * 1000 + t);
}

// Static shared memory + __syncthreads: the classic tree reduction, several blocks run one after
// another and each sees its own (reused) shared array.
__global__ void block_sum_static(const int* in, int* out) {
  __shared__ int partial[64];
  const int tid = threadIdx.x;
  partial[tid] = in[blockIdx.x * 64 + tid];
  __syncthreads();
  for (int stride = 32; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    __syncthreads();
  }
  if (tid == 0) out[blockIdx.x] = partial[0];
}

TEST_CASE(block_syncthreads_tree_reduction) {
  std::vector<int> in(3 * 64), out(3, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 7 % 13);
  CHECK_LAUNCH_OK(emu::launch(block_sum_static, dim3(3), dim3(64), 0, in.data(), out.data()));
  for (int b = 0; b < 3; ++b) {
    int expected = 0;
    for (int i = 0; i < 64; ++i) expected += in[b * 64 + i];
    CHECK_EQ(out[b], expected);
  }
}

__global__ void barrier_predicates(int* out) {
  const int tid = threadIdx.x;
  const int count = __syncthreads_count(tid % 3 == 0);
  const int all = __syncthreads_and(tid < 100);
  const int none = __syncthreads_and(tid < 5);
  const int any = __syncthreads_or(tid == 17);
  const int nothing = __syncthreads_or(0);
  if (tid == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = none;
    out[3] = any;
    out[4] = nothing;
  }
}

TEST_CASE(block_syncthreads_count_and_or) {
  std::vector<int> out(5, -1);
  CHECK_LAUNCH_OK(emu::launch(barrier_predicates, dim3(1), dim3(40), 0, out.data()));
  CHECK_EQ(out[0], 14);  // 0, 3, ..., 39
  CHECK_EQ(out[1], 1);
  CHECK_EQ(out[2], 0);
  CHECK_EQ(out[3], 1);
  CHECK_EQ(out[4], 0);
}

// Dynamic shared memory starts poisoned (0xFF bytes) in every block and is block-private.
__global__ void dynamic_smem_probe(unsigned* first_word, int* ok) {
  unsigned* smem = reinterpret_cast<unsigned*>(emu::dynamic_shared_memory());
  const int tid = threadIdx.x;
  if (tid == 0) first_word[blockIdx.x] = smem[0];
  __syncthreads();
  smem[tid] = blockIdx.x * 100 + tid;
  __syncthreads();
  const unsigned neighbour = smem[(tid + 1) % blockDim.x];
  if (neighbour != blockIdx.x * 100 + (tid + 1) % blockDim.x) ok[0] = 0;
}

TEST_CASE(block_dynamic_smem_poisoned_per_block) {
  std::vector<unsigned> first(3, 0);
  int ok = 1;
  CHECK_LAUNCH_OK(emu::launch(dynamic_smem_probe, dim3(3), dim3(16), 16 * sizeof(unsigned),
                              first.data(), &ok));
  for (unsigned word : first) CHECK_EQ(word, 0xFFFFFFFFu);
  CHECK_EQ(ok, 1);
}

}  // namespace

namespace {

// Many short blocks run one after another on the same threads: each block must start only after
// every thread of the previous one finished (static shared memory is reused), and no thread may
// miss the hand-over from one block to the next (a hang the TSan run once exposed).
__global__ void many_blocks(int* out) {
  __shared__ int value[8];
  value[threadIdx.x] = static_cast<int>(blockIdx.x);
  __syncthreads();
  if (value[(threadIdx.x + 1) % 8] != static_cast<int>(blockIdx.x)) atomicAdd(out, 1);
  __syncthreads();
}

TEST_CASE(block_many_sequential_blocks) {
  int wrong = 0;
  for (int round = 0; round < 4; ++round) {
    CHECK_LAUNCH_OK(emu::launch(many_blocks, dim3(64), dim3(8), 0, &wrong));
  }
  CHECK_EQ(wrong, 0);
}

}  // namespace
