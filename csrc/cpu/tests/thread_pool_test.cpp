// thread_team.cpp's own pool (the build without OpenMP, as with a toolchain that has none):
// calls of alternating team sizes, each rank of a call run exactly once and finished when
// parallel_run returns, the ranks meeting at a SpinBarrier as the recurrence's do. Run plain and
// under ThreadSanitizer and ASan+UBSan (csrc/emu/run_sanitizers.sh): a worker that sat one call
// out once ran the next call's rank twice and let that call return early (review, session 31).
#include <atomic>
#include <cstdio>

#include "thread_team.h"

#ifdef _OPENMP
#error "thread_pool_test covers the pool built without OpenMP"
#endif

int main() {
  constexpr int kCalls = 3000;
  constexpr int kSizes[] = {3, 2, 4, 1, 2, 3};  // a worker sits out every other call
  long failures = 0;
  for (int call = 0; call < kCalls; ++call) {
    const int n = kSizes[call % (sizeof(kSizes) / sizeof(kSizes[0]))];
    fusedrnn::cpu::SpinBarrier barrier(n, /*stall_micros=*/1000000);
    std::atomic<int> runs[4] = {0, 0, 0, 0};
    std::atomic<int> done{0};
    fusedrnn::cpu::parallel_run(n, [&](int rank) {
      runs[rank].fetch_add(1, std::memory_order_relaxed);
      fusedrnn::cpu::Team{rank, n, &barrier}.sync();
      done.fetch_add(1, std::memory_order_release);
    });
    bool ok = done.load(std::memory_order_acquire) == n;
    for (int r = 0; r < 4; ++r) ok = ok && runs[r].load() == (r < n ? 1 : 0);
    if (!ok) {
      if (failures < 5) {
        std::fprintf(stderr,
                     "call %d (%d threads): ranks run %d %d %d %d times, %d done at return\n",
                     call, n, runs[0].load(), runs[1].load(), runs[2].load(), runs[3].load(),
                     done.load());
      }
      ++failures;
    }
  }
  std::printf("thread_pool_test: %d calls, %ld wrong\n", kCalls, failures);
  return failures == 0 ? 0 : 1;
}
