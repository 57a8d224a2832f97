#include "thread_team.h"

#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FUSEDRNN_PAUSE() _mm_pause()
#else
#define FUSEDRNN_PAUSE() ((void)0)
#endif

namespace fusedrnn::cpu {

namespace {
// Spins before yielding (barrier) or sleeping (idle worker). A step of the recurrence takes
// microseconds, so a barrier normally completes well within the spin; an idle worker sleeps soon
// so that it does not steal a core from torch's own threads between our calls.
constexpr int kBarrierSpinMicros = 50;
constexpr int kIdleSpinsBeforeSleep = 1 << 12;
}  // namespace

SpinBarrier::SpinBarrier(int count, int64_t stall_micros)
    : count_(count), rounds_(0), stall_micros_(stall_micros) {
  while ((1 << rounds_) < count_) ++rounds_;
  announced_.reset(new Line[static_cast<size_t>(rounds_ > 0 ? rounds_ * count_ : 1)]);
}

void SpinBarrier::wait(int rank) {
  if (rounds_ == 0) return;  // a team of one
  // This member's epoch: one more than its last announcement (only it writes that line).
  const int64_t epoch = announced_[rank].value.load(std::memory_order_relaxed) + 1;
  int64_t stalled_for = 0;
  for (int k = 0; k < rounds_; ++k) {
    // Release: what this member (and, transitively, those it heard from) wrote before arriving
    // is visible to whoever acquires the announcement.
    announced_[k * count_ + rank].value.store(epoch, std::memory_order_release);
    const int from = (rank - (1 << k) + count_) % count_;
    stalled_for += spin_until_reaches(announced_[k * count_ + from].value, epoch);
  }
  // The first wait of a call also waits for the team to start (waking a sleeping worker took
  // ~100 us on the 2-core VM): that is not time lost to a descheduled member.
  if (stalled_for > 0 && epoch > 1) {
    stalled_micros_.fetch_add(stalled_for, std::memory_order_relaxed);
  }
}

// Spin while the wait is short; past kBarrierSpinMicros a team member has most likely lost its
// core to another process, so yield ours. A stalled wait is timed to its end (the clock is read
// every 64 spins or yields): the caller weighs the time lost, not just the number of stalls.
int64_t SpinBarrier::spin_until_reaches(const std::atomic<int64_t>& announced, int64_t epoch) {
  int spins = 0;
  auto start = std::chrono::steady_clock::time_point();
  auto now = start;
  bool yielding = false, stalled = false;
  while (announced.load(std::memory_order_acquire) < epoch) {
    if (yielding) {
      sched_yield();
    } else {
      FUSEDRNN_PAUSE();
    }
    if (++spins % 64 != 0) continue;
    now = std::chrono::steady_clock::now();
    if (spins == 64) {
      start = now;
      continue;
    }
    const auto waited = now - start;
    yielding = yielding || waited > std::chrono::microseconds(kBarrierSpinMicros);
    stalled = stalled || waited > std::chrono::microseconds(stall_micros_);
  }
  if (!stalled) return 0;
  const int64_t us =
      std::chrono::duration_cast<std::chrono::microseconds>(now - start).count();
  return us > 0 ? us : 1;
}

#ifndef _OPENMP
namespace {

class ThreadPool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> call_lock(call_mutex_);
    ensure_workers(n - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      job_threads_ = n;
      pending_.store(n - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    fn(0);
    while (pending_.load(std::memory_order_acquire) != 0) FUSEDRNN_PAUSE();
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = nullptr;
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int index = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, index] { worker_loop(index); });
    }
  }

  void worker_loop(int index) {
    int seen = 0;
    for (;;) {
      int spins = 0;
      int gen;
      while ((gen = generation_.load(std::memory_order_acquire)) == seen &&
             spins < kIdleSpinsBeforeSleep) {
        ++spins;
        FUSEDRNN_PAUSE();
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      // The job is read with its generation, under the lock that publishes both: a worker that
      // sits a call out is not waited for, so the call may end and the next one be published
      // between its seeing a new generation and its reading the job. Read apart, it ran the
      // next job's rank under the old generation and again under the new one, and that call
      // returned before all its ranks had run, then hung (review, session 31: ThreadSanitizer,
      // and a rank run twice once a delay was put there).
      const std::function<void(int)>* job;
      int job_threads;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (stop_) return;
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        job_threads = job_threads_;
      }
      if (index < job_threads) {
        (*job)(index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0;
  bool stop_ = false;
  alignas(64) std::atomic<int> generation_{0};
  alignas(64) std::atomic<int> pending_{0};
};

// A forked child has none of the parent's threads: it starts a fresh pool (the old one is leaked
// on purpose; its threads do not exist in the child and cannot be joined).
ThreadPool* g_pool = nullptr;
std::once_flag g_atfork_once;

std::mutex g_pool_mutex;

ThreadPool& pool() {
  std::call_once(g_atfork_once,
                 [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool == nullptr) g_pool = new ThreadPool();
  return *g_pool;
}

}  // namespace
#endif

bool parallel_run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return true;
  }
#ifdef _OPENMP
  // torch's own OpenMP threads: the module links libgomp.so.1, which resolves to the copy torch
  // already loaded, so this region runs on the threads that just ran torch's last op (and are
  // still spinning for work) instead of competing with them for the cores.
  bool complete = true;
#pragma omp parallel num_threads(n)
  {
    if (omp_get_num_threads() != n) {
#pragma omp single
      complete = false;
    } else {
      fn(omp_get_thread_num());
    }
  }
  return complete;
#else
  pool().run(n, fn);
  return true;
#endif
}

int available_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

}  // namespace fusedrnn::cpu
