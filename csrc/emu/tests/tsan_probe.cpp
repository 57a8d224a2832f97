// A deliberately racy kernel that run_sanitizers.sh runs under ThreadSanitizer and expects to be
// REPORTED: it proves that the emulator adds no happens-before edges beyond CUDA's (here: two
// warps that each only call __syncwarp share a shared-memory word, which is a race on a GPU).
// Without TSan it simply runs.
#include <cstdio>

#include <cuda_runtime.h>

__global__ void cross_warp_race(int* out) {
  __shared__ int word;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0 && lane == 0) word = 42;
  __syncwarp();  // orders only the lanes of one warp
  if (warp == 1 && lane == 0) *out = word;
}

int main() {
  int out = 0;
  const cudaError_t e = emu::launch(cross_warp_race, dim3(1), dim3(64), 0, &out);
  std::printf("tsan_probe: launch %s\n", cudaGetErrorName(e));
  return e == cudaSuccess ? 0 : 1;
}
