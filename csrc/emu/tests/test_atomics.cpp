// Atomics under contention (blocks running concurrently), a CAS spin lock guarding plain memory
// (ThreadSanitizer checks the happens-before the emulator provides), and CUDA's exact semantics of
// the less common atomics.
#include <vector>

#include <cooperative_groups.h>

#include "selftest.h"

namespace {

struct Counters {
  int i;
  unsigned u;
  unsigned long long ull;
  float f;
  double d;
  int max;
  int min;
};

__global__ void contended_atomics(Counters* c, int iterations) {
  const int id = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  for (int k = 0; k < iterations; ++k) {
    atomicAdd(&c->i, 1);
    atomicAdd(&c->u, 2u);
    atomicAdd(&c->ull, 3ull);
    atomicAdd(&c->f, 1.0f);
    atomicAdd(&c->d, 0.5);
    atomicMax(&c->max, id * 10 + k);
    atomicMin(&c->min, -id);
  }
}

TEST_CASE(atomics_under_contention) {
  Counters c{0, 0, 0, 0.0f, 0.0, -1, 0};
  const int blocks = 2, threads = 32, iterations = 20;
  CHECK_LAUNCH_OK(emu::launch_cooperative(contended_atomics, dim3(blocks), dim3(threads), 0, &c,
                                          iterations));
  const int n = blocks * threads * iterations;
  CHECK_EQ(c.i, n);
  CHECK_EQ(c.u, 2u * n);
  CHECK_EQ(c.ull, 3ull * n);
  CHECK(c.f == static_cast<float>(n));
  CHECK(c.d == 0.5 * n);
  CHECK_EQ(c.max, (blocks * threads - 1) * 10 + iterations - 1);
  CHECK_EQ(c.min, -(blocks * threads - 1));
}

struct LockArgs {
  int* lock;
  long* plain_counter;  // protected by the lock, not atomic
};

__global__ void spin_lock_increment(LockArgs args) {
  for (int k = 0; k < 5; ++k) {
    while (atomicCAS(args.lock, 0, 1) != 0) {
    }
    __threadfence();
    *args.plain_counter += 1;
    __threadfence();
    atomicExch(args.lock, 0);
  }
}

TEST_CASE(atomics_cas_spin_lock) {
  int lock = 0;
  long counter = 0;
  CHECK_LAUNCH_OK(emu::launch_cooperative(spin_lock_increment, dim3(2), dim3(8), 0,
                                          LockArgs{&lock, &counter}));
  CHECK_EQ(counter, 2l * 8 * 5);
}

__global__ void atomic_semantics(unsigned* u, int* i) {
  u[0] = atomicInc(&u[1], 2u);  // 2 -> 0 (old >= val wraps)
  u[2] = atomicInc(&u[3], 5u);  // 1 -> 2
  u[4] = atomicDec(&u[5], 7u);  // 0 -> 7
  u[6] = atomicDec(&u[7], 7u);  // 9 -> 7 (old > val)
  u[8] = atomicDec(&u[9], 7u);  // 4 -> 3
  i[0] = atomicCAS(&i[1], 5, 9);  // matches: 5 -> 9
  i[2] = atomicCAS(&i[3], 5, 9);  // no match: stays 6
  i[4] = atomicExch(&i[5], 11);
  i[6] = atomicSub(&i[7], 3);
  i[8] = atomicOr(&i[9], 6) | (atomicAnd(&i[9], 12) << 8) | (atomicXor(&i[9], 5) << 16);
}

TEST_CASE(atomics_exact_semantics) {
  std::vector<unsigned> u{0, 2, 0, 1, 0, 0, 0, 9, 0, 4};
  std::vector<int> i{0, 5, 0, 6, 0, 10, 0, 10, 0, 1};
  CHECK_LAUNCH_OK(emu::launch(atomic_semantics, dim3(1), dim3(1), 0, u.data(), i.data()));
  CHECK_EQ(u[0], 2u); CHECK_EQ(u[1], 0u);
  CHECK_EQ(u[2], 1u); CHECK_EQ(u[3], 2u);
  CHECK_EQ(u[4], 0u); CHECK_EQ(u[5], 7u);
  CHECK_EQ(u[6], 9u); CHECK_EQ(u[7], 7u);
  CHECK_EQ(u[8], 4u); CHECK_EQ(u[9], 3u);
  CHECK_EQ(i[0], 5); CHECK_EQ(i[1], 9);
  CHECK_EQ(i[2], 6); CHECK_EQ(i[3], 6);
  CHECK_EQ(i[4], 10); CHECK_EQ(i[5], 11);
  CHECK_EQ(i[6], 10); CHECK_EQ(i[7], 7);
  // or: 1 -> 7 (old 1); and 12: 7 -> 4 (old 7); xor 5: 4 -> 1 (old 4)
  CHECK_EQ(i[8], 1 | (7 << 8) | (4 << 16));
  CHECK_EQ(i[9], 1);
}

}  // namespace
