// Kernel launches on CPU threads and the error state they report through.
//
//   emu::launch(kernel, grid, block, dynamic_smem_bytes, args...)
//   emu::launch_cooperative(kernel, grid, block, dynamic_smem_bytes, args...)
//
// Both run the kernel to completion before returning (the emulator has no asynchrony), record any
// error as the host thread's last error (cudaGetLastError) and return it.
// - Non-cooperative launches run the blocks one after another on blockDim threads, so static
//   __shared__ variables behave as on the GPU.
// - Cooperative launches run every block at once (grid x block OS threads), so grid.sync() works;
//   the grid must fit the fake device's occupancy (emu::device_config()), as on the GPU, and
//   the kernel must use dynamic shared memory only.
// Launches are serialised process-wide; a launch from inside a kernel is refused.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <climits>
#include <condition_variable>
#include <memory>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu_engine.h"

namespace emu {
namespace detail {

inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local cudaError_t last_message_code = cudaSuccess;
inline thread_local std::string last_message;

inline cudaError_t record_error(cudaError_t code, std::string message) {
  last_error = code;
  last_message_code = code;
  last_message = std::move(message);
  return code;
}

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

struct FunctionAttributes {
  int max_dynamic_smem = -1;  // -1: not set (the 48 KiB default applies)
};
inline std::mutex& function_attributes_mutex() {
  static std::mutex mutex;
  return mutex;
}
inline std::map<const void*, FunctionAttributes>& function_attributes() {
  static std::map<const void*, FunctionAttributes> attributes;
  return attributes;
}
inline size_t dynamic_smem_limit(const void* fn) {
  std::lock_guard<std::mutex> lock(function_attributes_mutex());
  auto it = function_attributes().find(fn);
  const size_t base = device_config().smem_per_block;
  if (it == function_attributes().end() || it->second.max_dynamic_smem < 0) return base;
  return std::max(base, static_cast<size_t>(it->second.max_dynamic_smem));
}

inline std::string function_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  char buf[48];
  std::snprintf(buf, sizeof(buf), "<kernel at %p>", fn);
  return buf;
}

// Blocks of `block_threads` threads with `dynamic_smem` bytes each that fit one SM at once.
inline int max_active_blocks_per_sm(int block_threads, size_t dynamic_smem) {
  const DeviceConfig& c = device_config();
  if (block_threads <= 0 || block_threads > c.max_threads_per_block) return 0;
  if (dynamic_smem > c.smem_per_block_optin()) return 0;
  const int by_threads = c.max_threads_per_sm / (((block_threads + 31) / 32) * 32);
  const int by_smem = static_cast<int>(c.smem_per_sm / (dynamic_smem + c.smem_reserved_per_block));
  return std::min({c.max_blocks_per_sm, by_threads, by_smem});
}

inline std::string dims(dim3 d) {
  // Appended piece by piece: `"(" + std::to_string(...)` trips GCC 12's false -Wrestrict
  // (its bug 105651) in every file that includes this header.
  std::string text = "(";
  text += std::to_string(d.x);
  text += ',';
  text += std::to_string(d.y);
  text += ',';
  text += std::to_string(d.z);
  text += ')';
  return text;
}

inline uint3 block_index(int linear, dim3 grid) {
  const unsigned u = static_cast<unsigned>(linear);
  return uint3{u % grid.x, (u / grid.x) % grid.y, u / (grid.x * grid.y)};
}

struct ThreadTask {
  Launch* launch;
  const std::function<void()>* body;
  int tid;
  int block_begin;
  int block_end;
  bool shared_block_state;  // sequential launch: one BlockState reused by every block
};

inline void run_kernel_body(const std::function<void()>& body) {
  try {
    body();
  } catch (KernelFault&) {
    throw;
  } catch (std::exception& e) {
    fault(std::string("exception thrown by kernel code: ") + e.what());
  } catch (...) {
    fault("unknown exception thrown by kernel code");
  }
}

inline void emulated_thread(const ThreadTask& task) {
  Launch& l = *task.launch;
  ThreadContext& t = tls_context;
  t.launch = &l;
  t.tid = task.tid;
  t.warp = task.tid / 32;
  t.lane = task.tid % 32;
  const unsigned tid = static_cast<unsigned>(task.tid);
  threadIdx = uint3{tid % l.block.x, (tid / l.block.x) % l.block.y, tid / (l.block.x * l.block.y)};
  blockDim = l.block;
  gridDim = l.grid;
  try {
    for (int blk = task.block_begin; blk < task.block_end; ++blk) {
      BlockState& b = task.shared_block_state ? *l.blocks[0] : *l.blocks[static_cast<size_t>(blk)];
      t.block = &b;
      blockIdx = block_index(blk, l.grid);
      run_kernel_body(*task.body);
      const ExitInfo exit = on_thread_exit(t);
      if (task.shared_block_state && blk + 1 < task.block_end) {
        // The next block reuses the state (and the static __shared__ variables): wait until
        // every thread of this block has finished. The epoch was read at the exit, under the
        // lock, so a reset that happens before this thread gets here is not missed.
        std::unique_lock<std::mutex> lock(b.mu);
        if (exit.last) {
          reset_block(b, l);
          ++b.epoch;
          b.end_cv.notify_all();
        } else {
          wait_until(lock, b.end_cv, [&] { return b.epoch != exit.epoch; }, "end of block", "",
                     0);
        }
      }
    }
  } catch (KernelFault&) {
    wake_all(l);
  }
  t = ThreadContext{};
  threadIdx = uint3{0, 0, 0};
  blockIdx = uint3{0, 0, 0};
  blockDim = dim3{};
  gridDim = dim3{};
}

// OS threads for emulated CUDA threads, kept between launches: creating a thread costs more than
// a short kernel's whole run. One launch uses the pool at a time (launches are serialised); a
// launch hands each worker one task and waits until all are done. The pool is never destroyed
// (workers sleep until the process exits) and is rebuilt in a forked child, which inherits the
// pool's memory but not its threads.
class ThreadPool {
 public:
  // Runs every task on its own thread and returns when all have finished; false (nothing run)
  // when not enough threads can be started, with the number available in *available.
  bool run(const std::vector<ThreadTask>& tasks, size_t* available) {
    while (workers_.size() < tasks.size()) {
      auto worker = std::make_unique<Worker>();
      worker->pool = this;
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(
          &attr, std::max<size_t>(device_config().thread_stack_bytes, PTHREAD_STACK_MIN));
      const int rc = pthread_create(&worker->thread, &attr, &ThreadPool::worker_main, worker.get());
      pthread_attr_destroy(&attr);
      if (rc != 0) {
        *available = workers_.size();
        return false;
      }
      workers_.push_back(std::move(worker));
    }
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      pending_ = tasks.size();
    }
    for (size_t i = 0; i < tasks.size(); ++i) {
      Worker& w = *workers_[i];
      std::lock_guard<std::mutex> lock(w.mu);
      w.task = &tasks[i];
      w.cv.notify_one();
    }
    std::unique_lock<std::mutex> lock(done_mu_);
    done_cv_.wait(lock, [&] { return pending_ == 0; });
    *available = workers_.size();
    return true;
  }

 private:
  struct Worker {
    ThreadPool* pool = nullptr;
    pthread_t thread{};
    std::mutex mu;
    std::condition_variable cv;
    const ThreadTask* task = nullptr;
  };

  static void* worker_main(void* arg) {
    Worker& w = *static_cast<Worker*>(arg);
    for (;;) {
      const ThreadTask* task;
      {
        std::unique_lock<std::mutex> lock(w.mu);
        w.cv.wait(lock, [&] { return w.task != nullptr; });
        task = w.task;
        w.task = nullptr;
      }
      emulated_thread(*task);
      std::lock_guard<std::mutex> lock(w.pool->done_mu_);
      if (--w.pool->pending_ == 0) w.pool->done_cv_.notify_all();
    }
    return nullptr;
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  size_t pending_ = 0;
};

// Called with launch_mutex() held.
inline ThreadPool& thread_pool() {
  static ThreadPool* pool = nullptr;
  static pid_t owner = 0;
  if (pool == nullptr || owner != getpid()) {
    pool = new ThreadPool();  // intentionally never deleted: its threads outlive static destructors
    owner = getpid();
  }
  return *pool;
}

inline cudaError_t launch_erased(bool cooperative, const void* fn, dim3 grid, dim3 block,
                                 size_t dynamic_smem, const std::function<void()>& body) {
  const std::string name = function_name(fn);
  auto fail = [&](cudaError_t code, const std::string& why) {
    return record_error(code, "launch of " + name + " with grid " + dims(grid) + ", block " +
                                  dims(block) + ", " + std::to_string(dynamic_smem) +
                                  " B dynamic shared memory: " + why);
  };
  if (tls_context.launch != nullptr) {
    return fail(cudaErrorNotSupported, "launch from inside a kernel is not emulated");
  }
  if (fn == nullptr) return fail(cudaErrorInvalidDeviceFunction, "null kernel");
  const DeviceConfig& c = device_config();
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > static_cast<unsigned long long>(c.max_threads_per_block) ||
      block.x > 1024 || block.y > 1024 || block.z > 64) {
    return fail(cudaErrorInvalidConfiguration,
                "block must have 1.." + std::to_string(c.max_threads_per_block) +
                    " threads with x,y <= 1024 and z <= 64");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u ||
      grid.z > 65535u) {
    return fail(cudaErrorInvalidConfiguration,
                "grid must be at least 1 in every dimension, x <= 2^31-1, y,z <= 65535");
  }
  const size_t smem_limit = dynamic_smem_limit(fn);
  if (dynamic_smem > smem_limit) {
    return fail(cudaErrorInvalidValue,
                "dynamic shared memory exceeds the kernel's limit of " +
                    std::to_string(smem_limit) +
                    " B (above 48 KiB, call cudaFuncSetAttribute(kernel, "
                    "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first; device opt-in "
                    "maximum " + std::to_string(c.smem_per_block_optin()) + " B)");
  }
  const unsigned long long num_blocks = 1ull * grid.x * grid.y * grid.z;
  if (cooperative) {
    const long long fit = 1ll * max_active_blocks_per_sm(static_cast<int>(threads), dynamic_smem) *
                          c.sm_count;
    if (static_cast<long long>(num_blocks) > fit) {
      return fail(cudaErrorCooperativeLaunchTooLarge,
                  "a cooperative grid must be co-resident: at most " + std::to_string(fit) +
                      " blocks of this size fit the emulated device (" +
                      std::to_string(c.sm_count) + " SMs)");
    }
  } else if (num_blocks > 1000000ull) {
    return fail(cudaErrorInvalidConfiguration, "more than 10^6 blocks is too slow to emulate");
  }

  std::lock_guard<std::mutex> serial(launch_mutex());
  Launch l;
  l.grid = grid;
  l.block = block;
  l.threads_per_block = static_cast<int>(threads);
  l.num_blocks = static_cast<int>(num_blocks);
  l.dynamic_smem_bytes = dynamic_smem;
  l.cooperative = cooperative;
  l.blocks_concurrent = cooperative && num_blocks > 1;
  l.kernel_name = name;
  const int state_count = l.blocks_concurrent ? l.num_blocks : 1;
  for (int i = 0; i < state_count; ++i) {
    l.blocks.push_back(make_block(l));
    l.blocks.back()->index = block_index(i, grid);
  }
  std::vector<ThreadTask> tasks;
  if (l.blocks_concurrent) {
    for (int blk = 0; blk < l.num_blocks; ++blk) {
      for (int tid = 0; tid < l.threads_per_block; ++tid) {
        tasks.push_back(ThreadTask{&l, &body, tid, blk, blk + 1, false});
      }
    }
  } else {
    for (int tid = 0; tid < l.threads_per_block; ++tid) {
      tasks.push_back(ThreadTask{&l, &body, tid, 0, l.num_blocks, true});
    }
  }
  size_t available = 0;
  if (!thread_pool().run(tasks, &available)) {
    return fail(cudaErrorLaunchOutOfResources,
                "could not start " + std::to_string(tasks.size()) +
                    " OS threads for the emulated launch (" + std::to_string(available) +
                    " available)");
  }
  if (l.faulted.load()) return record_error(cudaErrorLaunchFailure, l.fault_message);
  return cudaSuccess;
}

template <class... KArgs, class... Args>
inline cudaError_t launch_typed(bool cooperative, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                size_t dynamic_smem, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args),
                "emu launch: the number of arguments does not match the kernel's parameters");
  // Kernel parameters are copied once, like the GPU's parameter buffer; each emulated thread
  // receives its own by-value copy when it calls the kernel.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&params, kernel] { std::apply(kernel, params); };
  return launch_erased(cooperative, reinterpret_cast<const void*>(kernel), grid, block,
                       dynamic_smem, body);
}

template <class... KArgs, size_t... I>
inline cudaError_t launch_from_pointers(bool cooperative, void (*kernel)(KArgs...), dim3 grid,
                                        dim3 block, size_t dynamic_smem, void** args,
                                        std::index_sequence<I...>) {
  if (sizeof...(KArgs) > 0 && args == nullptr) {
    return record_error(cudaErrorInvalidValue, "kernel launch: args is null");
  }
  return launch_typed(cooperative, kernel, grid, block, dynamic_smem,
                      *static_cast<std::decay_t<KArgs>*>(args[I])...);
}

}  // namespace detail

template <class... KArgs, class... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dynamic_smem,
                          Args&&... args) {
  return detail::launch_typed(false, kernel, grid, block, dynamic_smem,
                              std::forward<Args>(args)...);
}

template <class... KArgs, class... Args>
inline cudaError_t launch_cooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                      size_t dynamic_smem, Args&&... args) {
  return detail::launch_typed(true, kernel, grid, block, dynamic_smem,
                              std::forward<Args>(args)...);
}

// The detailed message of the last error recorded on this host thread (kept after
// cudaGetLastError clears the code).
inline const std::string& last_error_message() { return detail::last_message; }

}  // namespace emu
