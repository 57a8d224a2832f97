// The emulated m16n8k16 MMA against a plain matrix product, with the fragments packed from the PTX
// ISA's per-element formulas (row/col of a_i, b_i, c_i), independently of the twin's inverse map.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../cuda/mma.cuh"
#include "selftest.h"

namespace {

struct MmaProblem {
  const uint16_t* a;  // [warps][16][16] row-major, bits of bf16 or f16
  const uint16_t* b;  // [warps][16][8]  (K x N)
  const float* c;     // [warps][16][8]
  float* d;           // [warps][16][8]
  int is_bf16;
};

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type".
int a_row(int lane, int i) { return (lane >> 2) + ((i >= 2 && i < 4) || i >= 6 ? 8 : 0); }
int a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
int b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
int b_col(int lane, int) { return lane >> 2; }
int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

__global__ void mma_kernel(MmaProblem p) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint16_t* A = p.a + warp * 256;
  const uint16_t* B = p.b + warp * 128;
  const float* C = p.c + warp * 128;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int r = 0; r < 4; ++r) {  // a_{2r} low half, a_{2r+1} high half
    a[r] = A[a_row(lane, 2 * r) * 16 + a_col(lane, 2 * r)] |
           static_cast<uint32_t>(A[a_row(lane, 2 * r + 1) * 16 + a_col(lane, 2 * r + 1)]) << 16;
  }
  for (int r = 0; r < 2; ++r) {
    b[r] = B[b_row(lane, 2 * r) * 8 + b_col(lane, 2 * r)] |
           static_cast<uint32_t>(B[b_row(lane, 2 * r + 1) * 8 + b_col(lane, 2 * r + 1)]) << 16;
  }
  for (int i = 0; i < 4; ++i) c[i] = C[c_row(lane, i) * 8 + c_col(lane, i)];
  if (p.is_bf16) {
    fusedrnn::mma_m16n8k16_bf16(d, a, b, c);
  } else {
    fusedrnn::mma_m16n8k16_f16(d, a, b, c);
  }
  for (int i = 0; i < 4; ++i) p.d[warp * 128 + c_row(lane, i) * 8 + c_col(lane, i)] = d[i];
}

void run_mma_case(bool bf16) {
  const int warps = 2;
  std::mt19937 rng(bf16 ? 5 : 6);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<uint16_t> a(warps * 256), b(warps * 128);
  std::vector<float> c(warps * 128), d(warps * 128, NAN);
  auto to_bits = [&](float f) {
    return bf16 ? __bfloat16_as_ushort(__float2bfloat16(f)) : __half_as_ushort(__float2half(f));
  };
  auto to_float = [&](uint16_t u) {
    return bf16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
  };
  for (auto& v : a) v = to_bits(dist(rng));
  for (auto& v : b) v = to_bits(dist(rng));
  for (auto& v : c) v = dist(rng);
  CHECK_LAUNCH_OK(emu::launch(mma_kernel, dim3(1), dim3(32 * warps), 0,
                              MmaProblem{a.data(), b.data(), c.data(), d.data(), bf16 ? 1 : 0}));
  double worst = 0.0;
  for (int w = 0; w < warps; ++w)
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        double ref = c[w * 128 + m * 8 + n];
        for (int k = 0; k < 16; ++k)
          ref += double(to_float(a[w * 256 + m * 16 + k])) * double(to_float(b[w * 128 + k * 8 + n]));
        worst = std::max(worst, std::fabs(ref - d[w * 128 + m * 8 + n]) / (1.0 + std::fabs(ref)));
      }
  CHECK(worst < 1e-6);  // one float rounding of an exactly accumulated sum
}

TEST_CASE(mma_m16n8k16_bf16_matches_matmul) { run_mma_case(true); }
TEST_CASE(mma_m16n8k16_f16_matches_matmul) { run_mma_case(false); }

__global__ void mma_half_warp(float* out) {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4];
  fusedrnn::mma_m16n8k16_bf16(d, a, b, c);
  out[threadIdx.x] = d[0];
}

TEST_CASE(mma_needs_a_full_warp) {
  std::vector<float> out(16);
  CHECK_LAUNCH_FAILS(emu::launch(mma_half_warp, dim3(1), dim3(16), 0, out.data()),
                     cudaErrorLaunchFailure, "needs all 32 lanes");
}

}  // namespace

namespace {

// ldmatrix from shared memory yields the MMA fragments packed from the PTX formulas: x4 for the
// A tile (row-major 16x16), x2.trans for the B tile (row-major K x N, 16x8), x4.trans checked
// against the transpose definition.
struct LdmatrixArgs {
  const uint16_t* a;  // 16x16
  const uint16_t* b;  // 16x8
  int* mismatches;
};

__global__ void ldmatrix_kernel(LdmatrixArgs args) {
  uint16_t* tile_a = reinterpret_cast<uint16_t*>(emu::dynamic_shared_memory());
  uint16_t* tile_b = tile_a + 256;
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) tile_a[i] = args.a[i];
  for (int i = lane; i < 128; i += 32) tile_b[i] = args.b[i];
  __syncwarp();
  uint32_t a[4], b[2], at[4], a1[1];
  fusedrnn::ldmatrix_x4(a, &tile_a[(lane % 16) * 16 + (lane / 16) * 8]);
  fusedrnn::ldmatrix_x2_trans(b, &tile_b[(lane % 16) * 8]);
  fusedrnn::ldmatrix_x4_trans(at, &tile_a[(lane % 16) * 16 + (lane / 16) * 8]);
  fusedrnn::ldmatrix_x1(a1, &tile_a[(lane % 8) * 16]);
  int bad = 0;
  for (int r = 0; r < 4; ++r) {
    const uint32_t expected =
        args.a[a_row(lane, 2 * r) * 16 + a_col(lane, 2 * r)] |
        static_cast<uint32_t>(args.a[a_row(lane, 2 * r + 1) * 16 + a_col(lane, 2 * r + 1)]) << 16;
    bad += a[r] != expected;
    // transpose of matrix r (rows 8*(r%2).., cols 8*(r/2)..): element (row t, col g) of the
    // transpose is element (g, t) of the matrix
    const int row0 = 8 * (r % 2), col0 = 8 * (r / 2), g = lane / 4, t2 = 2 * (lane % 4);
    const uint32_t expected_t = args.a[(row0 + t2) * 16 + col0 + g] |
                                static_cast<uint32_t>(args.a[(row0 + t2 + 1) * 16 + col0 + g]) << 16;
    bad += at[r] != expected_t;
  }
  for (int r = 0; r < 2; ++r) {
    const uint32_t expected =
        args.b[b_row(lane, 2 * r) * 8 + b_col(lane, 2 * r)] |
        static_cast<uint32_t>(args.b[b_row(lane, 2 * r + 1) * 8 + b_col(lane, 2 * r + 1)]) << 16;
    bad += b[r] != expected;
  }
  bad += a1[0] != a[0];
  if (bad) atomicAdd(args.mismatches, bad);
}

TEST_CASE(mma_ldmatrix_fragments) {
  std::vector<uint16_t> a(256), b(128);
  for (int i = 0; i < 256; ++i) a[i] = static_cast<uint16_t>(i * 37 + 1);
  for (int i = 0; i < 128; ++i) b[i] = static_cast<uint16_t>(i * 91 + 5);
  int mismatches = 0;
  CHECK_LAUNCH_OK(emu::launch(ldmatrix_kernel, dim3(1), dim3(32), 384 * sizeof(uint16_t),
                              LdmatrixArgs{a.data(), b.data(), &mismatches}));
  CHECK_EQ(mismatches, 0);
}

__global__ void ldmatrix_misaligned() {
  uint16_t* tile = reinterpret_cast<uint16_t*>(emu::dynamic_shared_memory());
  uint32_t r[1];
  fusedrnn::ldmatrix_x1(r, tile + 1 + (threadIdx.x % 8) * 8);
}

TEST_CASE(mma_ldmatrix_needs_aligned_rows) {
  CHECK_LAUNCH_FAILS(emu::launch(ldmatrix_misaligned, dim3(1), dim3(32), 256), cudaErrorLaunchFailure,
                     "16-byte aligned");
}

}  // namespace
