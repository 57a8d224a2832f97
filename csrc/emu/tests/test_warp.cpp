// Warp intrinsics against independent references written from the CUDA programming guide's
// definitions (the emulator itself follows the PTX shfl.sync definition).
#include <cmath>
#include <cstring>
#include <vector>

#include "selftest.h"

namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

// Reference source lanes per the CUDA C++ Programming Guide.
int ref_idx(int lane, int src, int width) { return lane / width * width + ((src % width) + width) % width; }
int ref_up(int lane, unsigned delta, int width) {
  return (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
}
int ref_down(int lane, unsigned delta, int width) {
  return (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
}
int ref_xor(int lane, int mask, int width) {
  const int source = lane ^ mask;
  return source / width > lane / width ? lane : source;  // later groups: own value
}

__global__ void all_shuffles(int width, int* out) {
  const int lane = threadIdx.x;
  const int value = 1000 + lane;
  int* row = out + lane * 4;
  row[0] = __shfl_sync(kFull, value, (lane * 7 + 3) % 37, width);
  row[1] = __shfl_up_sync(kFull, value, 3, width);
  row[2] = __shfl_down_sync(kFull, value, 5, width);
  row[3] = __shfl_xor_sync(kFull, value, 6, width);
}

TEST_CASE(warp_shuffles_every_width) {
  for (int width : {1, 2, 4, 8, 16, 32}) {
    std::vector<int> out(32 * 4, 0);
    CHECK_LAUNCH_OK(emu::launch(all_shuffles, dim3(1), dim3(32), 0, width, out.data()));
    for (int lane = 0; lane < 32; ++lane) {
      CHECK_EQ(out[lane * 4 + 0], 1000 + ref_idx(lane, (lane * 7 + 3) % 37, width));
      CHECK_EQ(out[lane * 4 + 1], 1000 + ref_up(lane, 3, width));
      CHECK_EQ(out[lane * 4 + 2], 1000 + ref_down(lane, 5, width));
      CHECK_EQ(out[lane * 4 + 3], 1000 + ref_xor(lane, 6, width));
    }
  }
}

// 64-bit and floating-point payloads; a warp reduction with xor shuffles.
__global__ void shuffle_wide_types(double* out_double, long long* out_ll, float* out_sum) {
  const int lane = threadIdx.x;
  out_double[lane] = __shfl_sync(kFull, 0.5 + lane * 1e10, 31 - lane);
  out_ll[lane] = __shfl_xor_sync(kFull, (1ll << 40) + lane, 1);
  float sum = static_cast<float>(lane);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFull, sum, offset);
  out_sum[lane] = sum;
}

TEST_CASE(warp_shuffle_64bit_and_reduction) {
  std::vector<double> d(32);
  std::vector<long long> ll(32);
  std::vector<float> sum(32);
  CHECK_LAUNCH_OK(emu::launch(shuffle_wide_types, dim3(1), dim3(32), 0, d.data(), ll.data(),
                              sum.data()));
  for (int lane = 0; lane < 32; ++lane) {
    CHECK(d[lane] == 0.5 + (31 - lane) * 1e10);
    CHECK_EQ(ll[lane], (1ll << 40) + (lane ^ 1));
    CHECK(sum[lane] == 496.0f);
  }
}

// Two halves of a warp shuffle independently with disjoint masks at the same time.
__global__ void shuffle_half_masks(int* out) {
  const int lane = threadIdx.x;
  const unsigned mask = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  out[lane] = __shfl_sync(mask, lane * 10, lane < 16 ? 15 - lane : 47 - lane);
}

TEST_CASE(warp_shuffle_disjoint_partial_masks) {
  std::vector<int> out(32, -1);
  CHECK_LAUNCH_OK(emu::launch(shuffle_half_masks, dim3(1), dim3(32), 0, out.data()));
  for (int lane = 0; lane < 32; ++lane) {
    const int source = lane < 16 ? 15 - lane : 47 - lane;
    CHECK_EQ(out[lane], (source % 32) * 10);
  }
}

// A lane outside the mask is not a participant: reading it gives poison (undefined on the GPU).
__global__ void shuffle_from_non_participant(int* out) {
  const int lane = threadIdx.x;
  if (lane < 8) out[lane] = __shfl_sync(0xFFu, lane, lane + 8);
}

TEST_CASE(warp_shuffle_from_non_participant_is_poison) {
  std::vector<int> out(8, 0);
  CHECK_LAUNCH_OK(emu::launch(shuffle_from_non_participant, dim3(1), dim3(32), 0, out.data()));
  for (int v : out) CHECK_EQ(v, -1);
}

// A partial last warp (40 threads: warp 1 has lanes 0..7) with the full mask, as CUDA allows.
__global__ void partial_warp(int* out, unsigned* ballots) {
  const int tid = threadIdx.x, lane = tid % 32;
  out[tid] = __shfl_down_sync(kFull, tid, 1);
  const unsigned ballot = __ballot_sync(kFull, lane % 2 == 0);
  if (lane == 0) ballots[tid / 32] = ballot;
}

TEST_CASE(warp_partial_last_warp) {
  std::vector<int> out(40, 0);
  std::vector<unsigned> ballots(2, 0);
  CHECK_LAUNCH_OK(emu::launch(partial_warp, dim3(1), dim3(40), 0, out.data(), ballots.data()));
  for (int tid = 0; tid < 31; ++tid) CHECK_EQ(out[tid], tid + 1);
  CHECK_EQ(out[31], 31);  // own value at the end of the warp
  for (int tid = 32; tid < 39; ++tid) CHECK_EQ(out[tid], tid + 1);
  CHECK_EQ(out[39], -1);  // lane 8 of warp 1 does not exist
  CHECK_EQ(ballots[0], 0x55555555u);
  CHECK_EQ(ballots[1], 0x55u);
}

// Lanes that exited are not waited for by later full-mask operations.
__global__ void shuffle_after_exit(int* out) {
  const int lane = threadIdx.x;
  if (lane >= 20) return;
  out[lane] = __shfl_sync(kFull, lane, 19 - lane);
  __syncwarp();
}

TEST_CASE(warp_exited_lanes_not_waited_for) {
  std::vector<int> out(20, -5);
  CHECK_LAUNCH_OK(emu::launch(shuffle_after_exit, dim3(1), dim3(32), 0, out.data()));
  for (int lane = 0; lane < 20; ++lane) CHECK_EQ(out[lane], 19 - lane);
}

__global__ void votes(unsigned* out) {
  const int lane = threadIdx.x;
  unsigned* row = out + lane * 6;
  row[0] = __ballot_sync(kFull, lane % 3 == 0);
  row[1] = static_cast<unsigned>(__any_sync(kFull, lane == 30));
  row[2] = static_cast<unsigned>(__all_sync(kFull, lane < 31));
  row[3] = static_cast<unsigned>(__all_sync(kFull, lane < 32));
  if (lane < 8) {
    row[4] = __ballot_sync(0xFFu, 1);
    row[5] = static_cast<unsigned>(__all_sync(0xFFu, lane < 8));
  }
}

TEST_CASE(warp_ballot_any_all) {
  std::vector<unsigned> out(32 * 6, 7);
  CHECK_LAUNCH_OK(emu::launch(votes, dim3(1), dim3(32), 0, out.data()));
  for (int lane = 0; lane < 32; ++lane) {
    CHECK_EQ(out[lane * 6 + 0], 0x49249249u);
    CHECK_EQ(out[lane * 6 + 1], 1u);
    CHECK_EQ(out[lane * 6 + 2], 0u);
    CHECK_EQ(out[lane * 6 + 3], 1u);
    if (lane < 8) {
      CHECK_EQ(out[lane * 6 + 4], 0xFFu);
      CHECK_EQ(out[lane * 6 + 5], 1u);
    }
  }
}

__global__ void warp_reductions(unsigned* out) {
  const unsigned lane = threadIdx.x;
  const unsigned sum = __reduce_add_sync(kFull, lane);
  const unsigned max = __reduce_max_sync(kFull, lane * 3 % 31);
  const int min = __reduce_min_sync(kFull, static_cast<int>(lane) - 5);
  const unsigned bits = __reduce_or_sync(kFull, 1u << (lane % 4));
  if (lane == 31) {
    out[0] = sum;
    out[1] = max;
    out[2] = static_cast<unsigned>(min);
    out[3] = bits;
  }
}

TEST_CASE(warp_reduce_intrinsics) {
  std::vector<unsigned> out(4, 0);
  CHECK_LAUNCH_OK(emu::launch(warp_reductions, dim3(1), dim3(32), 0, out.data()));
  CHECK_EQ(out[0], 496u);
  CHECK_EQ(out[1], 30u);
  CHECK_EQ(static_cast<int>(out[2]), -5);
  CHECK_EQ(out[3], 0xFu);
}

// __syncwarp orders shared-memory traffic inside a warp (each warp of two uses its own half).
__global__ void syncwarp_exchange(int* out) {
  __shared__ int buffer[64];
  const int tid = threadIdx.x, lane = tid % 32, base = tid / 32 * 32;
  for (int round = 0; round < 3; ++round) {
    buffer[tid] = round * 100 + lane;
    __syncwarp();
    out[round * 64 + tid] = buffer[base + (lane + 1) % 32];
    __syncwarp();
  }
}

TEST_CASE(warp_syncwarp_orders_shared_memory) {
  std::vector<int> out(3 * 64, 0);
  CHECK_LAUNCH_OK(emu::launch(syncwarp_exchange, dim3(1), dim3(64), 0, out.data()));
  for (int round = 0; round < 3; ++round)
    for (int tid = 0; tid < 64; ++tid) CHECK_EQ(out[round * 64 + tid], round * 100 + (tid % 32 + 1) % 32);
}

}  // namespace

namespace {

__global__ void matches(unsigned* out) {
  const int lane = threadIdx.x;
  int pred = -1;
  out[lane * 3 + 0] = __match_any_sync(0xFFFFFFFFu, lane % 3);
  out[lane * 3 + 1] = __match_all_sync(0xFFFFFFFFu, 7.5, &pred);
  out[lane * 3 + 2] = __match_all_sync(0xFFFFFFFFu, lane / 16, &pred) | (pred == 0 ? 0u : 1u);
}

TEST_CASE(warp_match_any_all) {
  std::vector<unsigned> out(96, 1);
  CHECK_LAUNCH_OK(emu::launch(matches, dim3(1), dim3(32), 0, out.data()));
  for (int lane = 0; lane < 32; ++lane) {
    unsigned expected = 0;
    for (int other = 0; other < 32; ++other) expected |= (other % 3 == lane % 3 ? 1u : 0u) << other;
    CHECK_EQ(out[lane * 3 + 0], expected);
    CHECK_EQ(out[lane * 3 + 1], 0xFFFFFFFFu);
    CHECK_EQ(out[lane * 3 + 2], 0u);
  }
}

}  // namespace
