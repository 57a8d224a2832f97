// The emulated cp.async keeps the GPU's contract (emu_async_copy.h): the data is there after the
// wait and not before, misplaced or misaligned copies fault, and so does a thread that never
// waits. Also: ldmatrix rows must be in the block's shared memory.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../cuda/async_copy.cuh"
#include "../../cuda/mma.cuh"
#include "selftest.h"

namespace {

struct CopyArgs {
  const float* src;   // [threads * 4]
  float* landed;      // [threads * 4]: what the block reads after the wait and a barrier
  float* early;       // [threads * 4]: what each thread reads between the issue and the wait
};

// Thread i copies floats [4i, 4i+4) into shared memory, reads them back before waiting, waits,
// and after a barrier reads its neighbour's (another thread's copy, made visible by the barrier).
__global__ void copy_then_wait(CopyArgs args) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  const int i = static_cast<int>(threadIdx.x);
  const int n = static_cast<int>(blockDim.x);
  fusedrnn::copy_16_async(smem + 4 * i, args.src + 4 * i);
  for (int j = 0; j < 4; ++j) args.early[4 * i + j] = smem[4 * i + j];
  fusedrnn::wait_async_copies();
  __syncthreads();
  const int neighbour = (i + 1) % n;
  for (int j = 0; j < 4; ++j) args.landed[4 * neighbour + j] = smem[4 * neighbour + j];
}

TEST_CASE(async_copy_lands_at_the_wait_and_is_undefined_before) {
  constexpr int kThreads = 8;
  std::vector<float> src(kThreads * 4), landed(kThreads * 4, 0.f), early(kThreads * 4, 0.f);
  for (int i = 0; i < kThreads * 4; ++i) src[i] = static_cast<float>(i) + 0.5f;
  CHECK_LAUNCH_OK(emu::launch(copy_then_wait, dim3(1), dim3(kThreads), kThreads * 16,
                              CopyArgs{src.data(), landed.data(), early.data()}));
  for (int i = 0; i < kThreads * 4; ++i) {
    CHECK_EQ(landed[i], src[i]);
    CHECK(std::isnan(early[i]));
  }
}

// The source is read at the wait, the latest moment a GPU may read it: a write to the source
// between the issue and the wait shows in the copy (on a GPU it may or may not: a race).
__global__ void source_changes_before_the_wait(float* src, float* out) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  fusedrnn::copy_16_async(smem, src);
  src[0] = 42.f;
  fusedrnn::wait_async_copies();
  out[0] = smem[0];
}

TEST_CASE(async_copy_reads_its_source_at_the_wait) {
  alignas(16) float src[4] = {1.f, 2.f, 3.f, 4.f};
  float out = 0.f;
  CHECK_LAUNCH_OK(emu::launch(source_changes_before_the_wait, dim3(1), dim3(1), 16, src, &out));
  CHECK_EQ(out, 42.f);
}

__global__ void misaligned_copy(const float* src) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  fusedrnn::copy_16_async(smem + 1, src);
  fusedrnn::wait_async_copies();
}

__global__ void misaligned_source(const float* src) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  fusedrnn::copy_16_async(smem, src + 1);
  fusedrnn::wait_async_copies();
}

__global__ void copy_into_global(float* dst, const float* src) {
  fusedrnn::copy_16_async(dst, src);
  fusedrnn::wait_async_copies();
}

__global__ void copy_past_shared_memory(const float* src) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  fusedrnn::copy_16_async(smem + 4, src);  // the launch has 16 bytes of shared memory
  fusedrnn::wait_async_copies();
}

__global__ void copy_from_shared(const float*) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  fusedrnn::copy_16_async(smem, smem + 4);
  fusedrnn::wait_async_copies();
}

__global__ void copy_never_waited(const float* src) {
  float* smem = reinterpret_cast<float*>(emu::dynamic_shared_memory());
  fusedrnn::copy_16_async(smem, src);
}

TEST_CASE(async_copy_misuse_faults) {
  alignas(16) float src[8] = {};
  alignas(16) float dst[4] = {};
  CHECK_LAUNCH_FAILS(emu::launch(misaligned_copy, dim3(1), dim3(1), 64, src),
                     cudaErrorLaunchFailure, "16-byte aligned");
  CHECK_LAUNCH_FAILS(emu::launch(misaligned_source, dim3(1), dim3(1), 64, src),
                     cudaErrorLaunchFailure, "16-byte aligned");
  CHECK_LAUNCH_FAILS(emu::launch(copy_into_global, dim3(1), dim3(1), 64, dst, src),
                     cudaErrorLaunchFailure, "not in this block's dynamic shared memory");
  CHECK_LAUNCH_FAILS(emu::launch(copy_past_shared_memory, dim3(1), dim3(1), 16, src),
                     cudaErrorLaunchFailure, "not in this block's dynamic shared memory");
  CHECK_LAUNCH_FAILS(emu::launch(copy_from_shared, dim3(1), dim3(1), 64, src),
                     cudaErrorLaunchFailure, "the source is in shared memory");
  CHECK_LAUNCH_FAILS(emu::launch(copy_never_waited, dim3(1), dim3(1), 64, src),
                     cudaErrorLaunchFailure, "never waited for");
  // The next launch on the same worker threads starts with no copies pending.
  float landed[4] = {}, early[4] = {};
  CHECK_LAUNCH_OK(emu::launch(copy_then_wait, dim3(1), dim3(1), 16,
                              CopyArgs{src, landed, early}));
}

__global__ void ldmatrix_from_global(const uint16_t* rows) {
  uint32_t r[1];
  fusedrnn::ldmatrix_x1(r, rows + (threadIdx.x % 8) * 8);
}

TEST_CASE(ldmatrix_rows_must_be_in_shared_memory) {
  alignas(16) uint16_t rows[64] = {};
  CHECK_LAUNCH_FAILS(emu::launch(ldmatrix_from_global, dim3(1), dim3(32), 256, rows),
                     cudaErrorLaunchFailure, "not in this block's dynamic shared memory");
}

}  // namespace
