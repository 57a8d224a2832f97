// Runtime-API shims: launch-configuration errors as the GPU reports them, the shared-memory
// opt-in, occupancy of the fake device, attributes, the last-error slot, host-memory copies.
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "selftest.h"

namespace {

__global__ void noop() {}
__global__ void touch_smem(int* out) {
  unsigned char* smem = emu::dynamic_shared_memory();
  smem[threadIdx.x] = 1;
  if (threadIdx.x == 0) out[0] = 1;
}

TEST_CASE(runtime_bad_configurations) {
  CHECK_LAUNCH_FAILS(emu::launch(noop, dim3(1), dim3(1025), 0), cudaErrorInvalidConfiguration,
                     "block must have");
  CHECK_LAUNCH_FAILS(emu::launch(noop, dim3(0), dim3(32), 0), cudaErrorInvalidConfiguration,
                     "grid must be");
  CHECK_LAUNCH_FAILS(emu::launch(noop, dim3(1), dim3(1, 1, 65), 0), cudaErrorInvalidConfiguration,
                     "block must have");
}

TEST_CASE(runtime_dynamic_smem_opt_in) {
  int out = 0;
  const size_t big = 64 * 1024;
  CHECK_LAUNCH_FAILS(emu::launch(touch_smem, dim3(1), dim3(4), big, &out), cudaErrorInvalidValue,
                     "cudaFuncSetAttribute");
  CHECK_EQ(cudaFuncSetAttribute(touch_smem, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(big)),
           cudaSuccess);
  CHECK_LAUNCH_OK(emu::launch(touch_smem, dim3(1), dim3(4), big, &out));
  CHECK_EQ(out, 1);
  CHECK_EQ(cudaFuncSetAttribute(touch_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 20),
           cudaErrorInvalidValue);
  (void)cudaGetLastError();
}

TEST_CASE(runtime_occupancy_and_cooperative_limit) {
  int blocks = -1;
  CHECK_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, noop, 256, 0), cudaSuccess);
  CHECK_EQ(blocks, 4);  // 1024 threads per SM
  CHECK_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, noop, 32, 40 * 1024), cudaSuccess);
  CHECK_EQ(blocks, 2);  // 100 KiB / (40 KiB + 1 KiB reserved)
  CHECK_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, noop, 32, 200 * 1024), cudaSuccess);
  CHECK_EQ(blocks, 0);
  // 4 SMs x 1 block of 1024 threads: a cooperative grid of 5 such blocks cannot be co-resident.
  CHECK_LAUNCH_FAILS(emu::launch_cooperative(noop, dim3(5), dim3(1024), 0),
                     cudaErrorCooperativeLaunchTooLarge, "co-resident");
}

TEST_CASE(runtime_device_attributes) {
  int value = 0, device = -1;
  CHECK_EQ(cudaGetDevice(&device), cudaSuccess);
  CHECK_EQ(device, 0);
  CHECK_EQ(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  CHECK_EQ(value, emu::device_config().sm_count);
  CHECK_EQ(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), cudaSuccess);
  CHECK_EQ(value, 99 * 1024);
  CHECK_EQ(cudaDeviceGetAttribute(&value, cudaDevAttrCooperativeLaunch, 0), cudaSuccess);
  CHECK_EQ(value, 1);
  cudaDeviceProp prop;
  CHECK_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  CHECK_EQ(prop.warpSize, 32);
  CHECK(std::string(prop.name).find("emulator") != std::string::npos);
}

TEST_CASE(runtime_last_error_slot) {
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  const cudaError_t e = emu::launch(noop, dim3(1), dim3(2000), 0);
  CHECK_EQ(e, cudaErrorInvalidConfiguration);
  CHECK_EQ(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);
  CHECK_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  // The detailed message survives the clearing of the code.
  CHECK(std::string(cudaGetErrorString(e)).find("block must have") != std::string::npos);
  CHECK(std::string(cudaGetErrorName(e)) == "cudaErrorInvalidConfiguration");
}

TEST_CASE(runtime_memory_on_host) {
  std::vector<int> a(16, 3), b(16, 0);
  CHECK_EQ(cudaMemcpyAsync(b.data(), a.data(), 16 * sizeof(int), cudaMemcpyDeviceToDevice, nullptr),
           cudaSuccess);
  CHECK(b == a);
  CHECK_EQ(cudaMemsetAsync(b.data(), 0, 8 * sizeof(int), nullptr), cudaSuccess);
  CHECK_EQ(b[7], 0);
  CHECK_EQ(b[8], 3);
  void* p = nullptr;
  CHECK_EQ(cudaMalloc(&p, 100), cudaSuccess);
  CHECK(p != nullptr && reinterpret_cast<uintptr_t>(p) % 256 == 0);
  CHECK_EQ(cudaFree(p), cudaSuccess);
  CHECK_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
