// Threads for the CPU recurrence: a persistent pool (threads are created once and reused, because a
// recurrence call is often shorter than starting a thread) and a spin barrier for the one-per-step
// synchronisation inside a call. Kept free of any SIMD flags: compiled once, used by every ISA.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

namespace fusedrnn::cpu {

// Barrier for a fixed team, one call per step of the recurrence. A dissemination barrier: in round
// k (of ceil(log2 n)) member i announces its arrival in its own cache line and waits for member
// i - 2^k's announcement. With two threads that is one store and one load of the other's line per
// step: two cache-line transfers, where a shared arrival counter needs four (both members'
// read-for-ownership of the counter, the release, the waiter's reload). On the 2-core VM a B=1
// step is 0.2-1 us of work, and the counter barrier cost ~0.4 us of it.
// Announcements are epochs (the member's count of waits), so nothing is ever reset. Waiting
// spins (a step's imbalance is microseconds) and yields to the OS after a while, so that an
// oversubscribed machine still makes progress.
class SpinBarrier {
 public:
  // stall_micros: a wait longer than this counts as a stall. It should scale with the work of a
  // step: with milliseconds per step, a wait of 50 us is ordinary imbalance (a page fault, a
  // cache miss burst), not a member that lost its core.
  explicit SpinBarrier(int count, int64_t stall_micros = 50);
  // Member `rank` (0 <= rank < count) arrives and waits for all others.
  void wait(int rank);
  // Microseconds spent in waits that outlasted the stall budget (a member was most likely
  // descheduled), over all members and waits.
  int64_t stalled_micros() const { return stalled_micros_.load(std::memory_order_relaxed); }

 private:
  struct alignas(64) Line {
    std::atomic<int64_t> value{0};
  };
  // Returns the length of the wait in microseconds when it outlasted the stall budget, else 0.
  int64_t spin_until_reaches(const std::atomic<int64_t>& announced, int64_t epoch);

  int count_;
  int rounds_;
  int64_t stall_micros_;
  std::unique_ptr<Line[]> announced_;  // [rounds_ * count_]: member's latest epoch per round
  alignas(64) std::atomic<int64_t> stalled_micros_{0};
};

// The threads of one direction inside a call: this thread's index and the team's barrier.
struct Team {
  int rank = 0;
  int size = 1;
  SpinBarrier* barrier = nullptr;
  void sync() const {
    if (size > 1) barrier->wait(rank);
  }
};

// [begin, end) of `n` items for member `rank` of `size`, in contiguous blocks.
inline void split_range(int64_t n, int rank, int size, int64_t& begin, int64_t& end) {
  const int64_t base = n / size, extra = n % size;
  begin = rank * base + (rank < extra ? rank : extra);
  end = begin + base + (rank < extra ? 1 : 0);
}

// Runs fn(0), ..., fn(n-1) concurrently, fn(0) on the calling thread; returns when all are done.
// n is capped by the caller (never more threads than cores). With OpenMP these are torch's own
// OpenMP threads; without, a persistent pool. Returns false, having run nothing, when the runtime
// could not provide n threads (nested parallelism): the caller then runs on one thread.
bool parallel_run(int n, const std::function<void(int)>& fn);

// Logical CPUs this process may run on.
int available_cpus();

}  // namespace fusedrnn::cpu
