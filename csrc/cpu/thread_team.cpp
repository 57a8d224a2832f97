#include "thread_team.h"

#include <pthread.h>
#include <sched.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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
constexpr int kBarrierSpinsBeforeYield = 1 << 14;
constexpr int kIdleSpinsBeforeSleep = 1 << 12;
}  // namespace

void SpinBarrier::wait() {
  const int gen = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == count_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    return;
  }
  int spins = 0;
  while (generation_.load(std::memory_order_acquire) == gen) {
    if (++spins < kBarrierSpinsBeforeYield) {
      FUSEDRNN_PAUSE();
    } else {
      sched_yield();
    }
  }
}

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
        gen = generation_.load(std::memory_order_acquire);
      }
      seen = gen;
      if (stop_) return;
      if (index < job_threads_) {
        (*job_)(index);
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

void parallel_run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  pool().run(n, fn);
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
