// The emulator's execution engine: launch state, per-block barriers, per-warp exchanges, the grid
// barrier, fault reporting and deadlock detection. Test-only; header-only so that a consumer needs
// nothing but `-I csrc/emu` and pthreads.
//
// Model. Every emulated CUDA thread is an OS thread. A block's barrier state lives under the
// block's barrier mutex, each warp's exchange state under that warp's own mutex, so the
// happens-before edges ThreadSanitizer sees are exactly those of CUDA: __syncthreads orders the
// whole block, a warp intrinsic only its warp (a race between warps that only __syncwarp "orders"
// is reported). One atomic word per block counts its blocked and exited threads (relaxed RMWs:
// exact, but no ordering for TSan): when every live thread of a block waits in a block-level
// collective (a barrier or a warp exchange) that has not completed, none can ever complete it,
// and the emulator reports a deadlock naming where each thread waits instead of hanging.
//
// Faults (divergent barrier, bad mask, deadlock, an exception from kernel code) are recorded on
// the launch, every emulated thread is unwound with emu::KernelFault, and the launch returns
// cudaErrorLaunchFailure with the message (cudaGetErrorString / emu::last_error_message()).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <string>
#include <vector>

#include "emu_keywords.h"
#include "emu_runtime_types.h"

namespace emu {

// The fake device the emulator reports through the runtime shims. Defaults describe a small
// sm_80-like GPU so that occupancy-driven code paths (cooperative grid sizing) stay tiny:
//   4 SMs, 1024 threads and 100 KiB shared memory per SM, 48 KiB per block by default and
//   99 KiB per block after cudaFuncSetAttribute(MaxDynamicSharedMemorySize) opt-in.
// Environment overrides (read once): FUSEDRNN_EMU_SM_COUNT, FUSEDRNN_EMU_SMEM_PER_SM (bytes),
// FUSEDRNN_EMU_WATCHDOG_S (seconds without progress before a wait is reported as a hang),
// FUSEDRNN_EMU_STACK_KB (stack per emulated thread), FUSEDRNN_EMU_ABORT_ON_FAULT=1 (abort the
// process on a kernel fault instead of returning an error; for debuggers and core dumps).
struct DeviceConfig {
  int sm_count = 4;
  int max_threads_per_sm = 1024;
  int max_threads_per_block = 1024;
  int max_blocks_per_sm = 32;
  size_t smem_per_sm = 100 * 1024;
  size_t smem_per_block = 48 * 1024;
  size_t smem_reserved_per_block = 1024;
  int regs_per_sm = 65536;
  int cc_major = 8;
  int cc_minor = 0;
  double watchdog_seconds = 120.0;
  size_t thread_stack_bytes = 1024 * 1024;
  bool abort_on_fault = false;
  size_t smem_per_block_optin() const { return smem_per_sm - smem_reserved_per_block; }
};

namespace detail {
inline long env_long(const char* name, long fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  if (end == value || *end != '\0' || parsed < 0) {
    std::fprintf(stderr, "fusedrnn emulator: ignoring %s='%s' (expected a non-negative integer)\n",
                 name, value);
    return fallback;
  }
  return parsed;
}
inline DeviceConfig make_device_config() {
  DeviceConfig config;
  config.sm_count = static_cast<int>(env_long("FUSEDRNN_EMU_SM_COUNT", config.sm_count));
  if (config.sm_count < 1) config.sm_count = 1;
  config.smem_per_sm =
      static_cast<size_t>(env_long("FUSEDRNN_EMU_SMEM_PER_SM", static_cast<long>(config.smem_per_sm)));
  config.watchdog_seconds = static_cast<double>(
      env_long("FUSEDRNN_EMU_WATCHDOG_S", static_cast<long>(config.watchdog_seconds)));
  config.thread_stack_bytes = static_cast<size_t>(
      env_long("FUSEDRNN_EMU_STACK_KB", static_cast<long>(config.thread_stack_bytes / 1024))) * 1024;
  config.abort_on_fault = env_long("FUSEDRNN_EMU_ABORT_ON_FAULT", 0) != 0;
  return config;
}
}  // namespace detail

// Mutable so that tests can shrink or grow the fake device; change it only between launches.
inline DeviceConfig& device_config() {
  static DeviceConfig config = detail::make_device_config();
  return config;
}

// Thrown inside emulated threads to unwind them after a fault. Kernel code must not catch it.
struct KernelFault {};

namespace detail {

enum class WarpOp : uint8_t { kShflIdx, kShflUp, kShflDown, kShflXor, kVote, kSyncWarp, kReduce,
                              kMatchAny, kMma, kLdMatrix };
constexpr int kLanePayloadWords = 12;  // enough for one m16n8k16 MMA operand set (4 + 2 + 4)

// One in-flight warp-synchronous operation of a set of lanes (its mask).
struct WarpSlot {
  bool in_use = false;
  bool complete = false;
  uint32_t mask = 0;          // the mask the lanes passed
  uint32_t required = 0;      // mask lanes that exist and have not exited (shrinks on exit)
  uint32_t arrived = 0;       // lanes that have deposited their operands
  int readers_left = 0;       // arrived lanes that have not yet read the result
  WarpOp op = WarpOp::kSyncWarp;
  int param = 0;              // width for shuffles
  uint32_t words[32][kLanePayloadWords];
};

struct WarpState {
  std::mutex mu;
  std::condition_variable cv;
  uint32_t live = 0;  // lanes that exist in this (possibly partial) warp and have not exited
  std::vector<std::unique_ptr<WarpSlot>> slots;
};

// What a blocked thread waits for, for deadlock and watchdog reports.
struct WaitSite {
  const char* what = nullptr;  // nullptr: not waiting
  const char* file = "";
  unsigned line = 0;
  uint32_t mask = 0;
};
// Written by its thread, read by whoever reports a deadlock: relaxed atomics, so the report does
// not race and does not order anything for TSan.
struct WaitSlot {
  std::atomic<const char*> what{nullptr};
  std::atomic<const char*> file{""};
  std::atomic<unsigned> line{0};
  std::atomic<uint32_t> mask{0};
  void set(const char* w, const char* f, unsigned l, uint32_t m) {
    file.store(f, std::memory_order_relaxed);
    line.store(l, std::memory_order_relaxed);
    mask.store(m, std::memory_order_relaxed);
    what.store(w, std::memory_order_relaxed);
  }
  void clear() { what.store(nullptr, std::memory_order_relaxed); }
  WaitSite load() const {
    return WaitSite{what.load(std::memory_order_relaxed), file.load(std::memory_order_relaxed),
                    line.load(std::memory_order_relaxed), mask.load(std::memory_order_relaxed)};
  }
};

// blocked threads in the low 32 bits, exited threads in the high 32 bits of one atomic word, so
// that one RMW both updates and snapshots the pair.
constexpr uint64_t kOneExited = uint64_t{1} << 32;
inline int blocked_of(uint64_t counts) { return static_cast<int>(counts & 0xFFFFFFFFu); }
inline int exited_of(uint64_t counts) { return static_cast<int>(counts >> 32); }

enum class BarrierKind : uint8_t { kSync, kSyncCount, kSyncAnd, kSyncOr, kGrid };

constexpr std::align_val_t kSmemAlignment{128};
struct AlignedBytesDelete {
  void operator()(std::byte* p) const { ::operator delete[](p, kSmemAlignment); }
};
using AlignedBytes = std::unique_ptr<std::byte, AlignedBytesDelete>;

struct BlockState {
  std::mutex mu;  // barrier state, exits, end of block (sequential launches)
  std::condition_variable barrier_cv;
  std::condition_variable end_cv;
  uint3 index{0, 0, 0};
  int nthreads = 0;
  // threads waiting in an incomplete block-level collective, and threads that exited
  std::atomic<uint64_t> counts{0};
  std::vector<WarpState> warps;
  std::unique_ptr<WaitSlot[]> waits;  // per linear thread id
  // __syncthreads state (under mu)
  int bar_arrived = 0;
  uint64_t bar_generation = 0;
  BarrierKind bar_kind = BarrierKind::kSync;
  const char* bar_file = "";
  unsigned bar_line = 0;
  int bar_true_count = 0;
  int bar_result = 0;
  // dynamic shared memory of this block (poisoned with 0xFF bytes, i.e. NaN floats)
  AlignedBytes dynamic_smem;
  size_t dynamic_smem_bytes = 0;
  // sequential (non-cooperative) launches reuse one BlockState for every block
  uint64_t epoch = 0;
};

struct Launch {
  dim3 grid, block;
  int threads_per_block = 0;
  int num_blocks = 0;
  size_t dynamic_smem_bytes = 0;
  bool cooperative = false;
  bool blocks_concurrent = false;
  std::string kernel_name;
  std::vector<std::unique_ptr<BlockState>> blocks;
  // fault
  std::atomic<bool> faulted{false};
  std::mutex fault_mu;
  std::string fault_message;
  // grid barrier (cooperative launches): one representative thread per block arrives
  std::mutex grid_mu;
  std::condition_variable grid_cv;
  int grid_arrived = 0;
  uint64_t grid_generation = 0;
  int grid_blocks_exited = 0;
  const char* grid_file = "";
  unsigned grid_line = 0;
};

// A cp.async copy a thread issued and has not yet waited for (emu_async_copy.h).
struct PendingAsyncCopy {
  void* dst;
  const void* src;
  const char* file;
  unsigned line;
};

struct ThreadContext {
  Launch* launch = nullptr;
  BlockState* block = nullptr;
  int tid = 0;   // linear thread index in the block (x fastest), as CUDA numbers lanes
  int warp = 0;
  int lane = 0;
  std::vector<PendingAsyncCopy> pending_copies;  // in issue order
};
inline thread_local ThreadContext tls_context;

inline std::string describe_thread(const ThreadContext& t) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "thread (%u,%u,%u) [warp %d lane %d] of block (%u,%u,%u)",
                threadIdx.x, threadIdx.y, threadIdx.z, t.warp, t.lane, blockIdx.x, blockIdx.y,
                blockIdx.z);
  return buf;
}

inline std::string describe_site(const char* what, const char* file, unsigned line) {
  const char* base = std::strrchr(file, '/');
  return std::string(what) + " at " + (base ? base + 1 : file) + ":" + std::to_string(line);
}

// Records the first fault of the launch, then unwinds the calling thread. Call without holding
// any lock other than a std::unique_lock that unwinding releases.
[[noreturn]] inline void fault(const std::string& message) {
  ThreadContext& t = tls_context;
  if (t.launch == nullptr) {
    std::fprintf(stderr, "fusedrnn emulator: %s (outside any kernel launch)\n", message.c_str());
    std::abort();
  }
  {
    std::lock_guard<std::mutex> lock(t.launch->fault_mu);
    if (!t.launch->faulted.load()) {
      t.launch->fault_message = "kernel " + t.launch->kernel_name + ": " + describe_thread(t) +
                                ": " + message;
      std::fprintf(stderr, "fusedrnn emulator fault: %s\n", t.launch->fault_message.c_str());
      t.launch->faulted.store(true);
    }
  }
  if (device_config().abort_on_fault) std::abort();
  throw KernelFault{};
}

inline ThreadContext& context_or_fault(const char* what) {
  ThreadContext& t = tls_context;
  if (t.launch == nullptr) {
    std::fprintf(stderr, "fusedrnn emulator: %s called outside a kernel launch\n", what);
    std::abort();
  }
  return t;
}

// Lists where the waiting threads of a block wait, consecutive threads at the same place in one
// line ("threads 16-31: __syncthreads() at k.cu:40"). Caller holds block.mu.
inline std::string describe_block_waits(const BlockState& b, const Launch& l) {
  (void)l;
  auto same = [](const WaitSite& x, const WaitSite& y) {
    return x.what == y.what && x.line == y.line && x.mask == y.mask &&
           (x.file == y.file || std::strcmp(x.file, y.file) == 0);
  };
  std::string out;
  int groups = 0;
  for (int tid = 0; tid < b.nthreads;) {
    const WaitSite w = b.waits[tid].load();
    int last = tid;
    while (last + 1 < b.nthreads && same(b.waits[last + 1].load(), w)) ++last;
    if (w.what != nullptr) {
      if (groups++ == 24) {
        out += "\n    ...";
        break;
      }
      char buf[96];
      if (last == tid) {
        std::snprintf(buf, sizeof(buf), "\n    thread %d (warp %d lane %d): ", tid, tid / 32, tid % 32);
      } else {
        std::snprintf(buf, sizeof(buf), "\n    threads %d-%d: ", tid, last);
      }
      out += buf;
      out += describe_site(w.what, w.file, w.line);
      if (w.mask != 0) {
        std::snprintf(buf, sizeof(buf), " mask 0x%08x", w.mask);
        out += buf;
      }
    }
    tid = last + 1;
  }
  out += "\n    (thread numbers are linear ids in the block: x + y*blockDim.x + z*blockDim.x*blockDim.y)";
  return out;
}

// Called with `counts` as just updated by this thread (it blocked or exited): if every live thread
// of the block now waits in an incomplete block-level collective, none can ever be released.
inline void check_block_deadlock(BlockState& b, const Launch& l, uint64_t counts) {
  const int blocked = blocked_of(counts), exited = exited_of(counts);
  if (blocked > 0 && blocked + exited == b.nthreads) {
    fault("deadlock: every live thread of the block waits and none can release the others (" +
          std::to_string(exited) + " exited):" + describe_block_waits(b, l));
  }
}
inline uint64_t add_blocked(BlockState& b, int delta) {
  return b.counts.fetch_add(static_cast<uint64_t>(static_cast<int64_t>(delta)),
                            std::memory_order_relaxed) +
         static_cast<uint64_t>(static_cast<int64_t>(delta));
}

// Waits on `cv` until done(); unwinds when the launch faulted; reports a hang after the watchdog
// time. The periodic wake-up is only for the watchdog: releases notify the condition variable.
template <class Done>
inline void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Done done,
                       const char* what, const char* file, unsigned line) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  Launch& l = *tls_context.launch;
  while (!done()) {
    if (l.faulted.load()) throw KernelFault{};
    cv.wait_for(lock, std::chrono::seconds(1));
    if (done()) break;
    if (l.faulted.load()) throw KernelFault{};
    const double waited = std::chrono::duration<double>(clock::now() - start).count();
    if (waited > device_config().watchdog_seconds) {
      fault("watchdog: waited " + std::to_string(static_cast<int>(waited)) + " s at " +
            describe_site(what, file, line) +
            " without being released (a hang: some thread never arrives, e.g. it spins on a flag "
            "or waits at another barrier)");
    }
  }
}

// Wakes every waiting thread of a launch so that it notices a fault. Holds no lock on entry.
inline void wake_all(Launch& l) {
  for (auto& bp : l.blocks) {
    {
      std::lock_guard<std::mutex> lock(bp->mu);
      bp->barrier_cv.notify_all();
      bp->end_cv.notify_all();
    }
    for (auto& w : bp->warps) {
      std::lock_guard<std::mutex> lock(w.mu);
      w.cv.notify_all();
    }
  }
  std::lock_guard<std::mutex> lock(l.grid_mu);
  l.grid_cv.notify_all();
}

// ---------------------------------------------------------------- grid barrier
// The last thread of a block to reach grid.sync() arrives here for the whole block, as the
// hardware implementation does (block barrier, one thread per block on the grid barrier).
inline void grid_arrive(Launch& l, const char* file, unsigned line) {
  std::unique_lock<std::mutex> lock(l.grid_mu);
  if (l.grid_blocks_exited > 0) {
    fault(describe_site("grid.sync()", file, line) + " reached after " +
          std::to_string(l.grid_blocks_exited) +
          " block(s) of the grid already exited: it can never complete");
  }
  if (l.grid_arrived == 0) {
    l.grid_file = file;
    l.grid_line = line;
  }
  if (++l.grid_arrived == l.num_blocks) {
    l.grid_arrived = 0;
    ++l.grid_generation;
    l.grid_cv.notify_all();
    return;
  }
  const uint64_t generation = l.grid_generation;
  wait_until(lock, l.grid_cv, [&] { return l.grid_generation != generation; }, "grid.sync()", file,
             line);
}

// ---------------------------------------------------------------- block barrier
inline int block_barrier(BarrierKind kind, int predicate, const char* what,
                         const std::source_location& loc) {
  ThreadContext& t = context_or_fault(what);
  Launch& l = *t.launch;
  BlockState& b = *t.block;
  std::unique_lock<std::mutex> lock(b.mu);
  if (l.faulted.load()) throw KernelFault{};
  if (kind == BarrierKind::kGrid && !l.cooperative) {
    fault(describe_site(what, loc.file_name(), loc.line()) +
          " in a launch that is not cooperative (launch with cudaLaunchCooperativeKernel or "
          "emu::launch_cooperative)");
  }
  const int exited = exited_of(b.counts.load(std::memory_order_relaxed));  // updated under mu
  if (exited > 0) {
    fault(describe_site(what, loc.file_name(), loc.line()) + " reached after " +
          std::to_string(exited) +
          " thread(s) of the block exited: a block barrier needs every thread of the block");
  }
  if (b.bar_arrived == 0) {
    b.bar_kind = kind;
    b.bar_file = loc.file_name();
    b.bar_line = loc.line();
  } else if (b.bar_kind != kind || b.bar_line != loc.line() ||
             std::strcmp(b.bar_file, loc.file_name()) != 0) {
    fault("divergent barrier: this thread reached " +
          describe_site(what, loc.file_name(), loc.line()) + " while " +
          std::to_string(b.bar_arrived) + " thread(s) wait at a different barrier:" +
          describe_block_waits(b, l));
  }
  b.bar_true_count += predicate != 0;
  if (++b.bar_arrived == b.nthreads) {
    int result = 0;
    switch (kind) {
      case BarrierKind::kSyncCount: result = b.bar_true_count; break;
      case BarrierKind::kSyncAnd: result = b.bar_true_count == b.nthreads; break;
      case BarrierKind::kSyncOr: result = b.bar_true_count > 0; break;
      default: break;
    }
    if (kind == BarrierKind::kGrid) {
      // Everyone else of the block stays blocked here while this thread represents the block.
      lock.unlock();
      grid_arrive(l, loc.file_name(), loc.line());
      lock.lock();
    }
    b.bar_result = result;
    b.bar_arrived = 0;
    b.bar_true_count = 0;
    ++b.bar_generation;
    add_blocked(b, -(b.nthreads - 1));
    b.barrier_cv.notify_all();
    return result;
  }
  const uint64_t generation = b.bar_generation;
  b.waits[t.tid].set(what, loc.file_name(), loc.line(), 0);
  check_block_deadlock(b, l, add_blocked(b, 1));
  wait_until(lock, b.barrier_cv, [&] { return b.bar_generation != generation; }, what,
             loc.file_name(), loc.line());
  b.waits[t.tid].clear();
  return b.bar_result;
}

// ---------------------------------------------------------------- warp exchange
// Deposits this lane's operand words, waits until every live lane of `mask` has deposited (as
// the *_sync intrinsics do: lanes that exited are not waited for), then calls
// read(slot, arrived_mask) under the block lock to form this lane's result.
template <class Read>
inline void warp_exchange(WarpOp op, int param, uint32_t mask, const uint32_t* words, int nwords,
                          const char* what, const std::source_location& loc, Read&& read) {
  ThreadContext& t = context_or_fault(what);
  Launch& l = *t.launch;
  BlockState& b = *t.block;
  const uint32_t bit = 1u << t.lane;
  WarpState& w = b.warps[t.warp];
  std::unique_lock<std::mutex> lock(w.mu);
  if (l.faulted.load()) throw KernelFault{};
  if ((mask & bit) == 0) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), " with mask 0x%08x", mask);
    fault(describe_site(what, loc.file_name(), loc.line()) + buf +
          " that does not include the calling lane " + std::to_string(t.lane));
  }
  WarpSlot* slot = nullptr;
  for (auto& s : w.slots) {
    if (s->in_use && !s->complete && (s->required & bit) && s->mask == mask) {
      slot = s.get();
      break;
    }
  }
  if (slot != nullptr && (slot->op != op || slot->param != param)) {
    fault("divergent warp operation: lane " + std::to_string(t.lane) + " reached " +
          describe_site(what, loc.file_name(), loc.line()) +
          " while lanes of the same mask wait in a different warp intrinsic (or width):" +
          describe_block_waits(b, l));
  }
  if (slot == nullptr) {
    for (auto& s : w.slots) {
      if (!s->in_use) {
        slot = s.get();
        break;
      }
    }
    if (slot == nullptr) {
      w.slots.push_back(std::make_unique<WarpSlot>());
      slot = w.slots.back().get();
    }
    slot->in_use = true;
    slot->complete = false;
    slot->mask = mask;
    slot->required = mask & w.live;
    slot->arrived = 0;
    slot->readers_left = 0;
    slot->op = op;
    slot->param = param;
  }
  if (nwords > 0) {
    std::memcpy(slot->words[t.lane], words, sizeof(uint32_t) * static_cast<size_t>(nwords));
  }
  slot->arrived |= bit;
  ++slot->readers_left;
  if (slot->arrived == slot->required) {
    slot->complete = true;
    add_blocked(b, -(__builtin_popcount(slot->arrived) - 1));
    w.cv.notify_all();
  } else {
    b.waits[t.tid].set(what, loc.file_name(), loc.line(), mask);
    check_block_deadlock(b, l, add_blocked(b, 1));
    wait_until(lock, w.cv, [&] { return slot->complete; }, what, loc.file_name(), loc.line());
    b.waits[t.tid].clear();
  }
  read(*slot);
  if (--slot->readers_left == 0) slot->in_use = false;
}

// ---------------------------------------------------------------- thread exit
struct ExitInfo {
  bool last;       // this was the last thread of the block to exit
  uint64_t epoch;  // the block state's epoch at the exit (sequential launches wait for the next)
};

inline ExitInfo on_thread_exit(ThreadContext& t) {
  Launch& l = *t.launch;
  BlockState& b = *t.block;
  if (l.faulted.load()) throw KernelFault{};
  if (!t.pending_copies.empty()) {
    const PendingAsyncCopy& first = t.pending_copies.front();
    fault("exited with " + std::to_string(t.pending_copies.size()) +
          " cp.async copies never waited for (the first issued by " +
          describe_site("copy_16_async()", first.file, first.line) +
          "): wait_async_copies() must land them before their data is used");
  }
  const uint32_t bit = 1u << t.lane;
  {
    WarpState& w = b.warps[t.warp];
    std::lock_guard<std::mutex> warp_lock(w.mu);
    w.live &= ~bit;
    for (auto& s : w.slots) {
      if (!s->in_use || s->complete || (s->required & bit) == 0) continue;
      s->required &= ~bit;  // an exited lane is not waited for, as on the GPU
      if (s->arrived == s->required) {
        s->complete = true;
        add_blocked(b, -__builtin_popcount(s->arrived));
        w.cv.notify_all();
      }
    }
  }
  std::unique_lock<std::mutex> lock(b.mu);
  const uint64_t counts = b.counts.fetch_add(kOneExited, std::memory_order_relaxed) + kOneExited;
  if (b.bar_arrived > 0) {
    fault("divergent barrier: the thread exited the kernel while " +
          std::to_string(b.bar_arrived) + " thread(s) of its block wait at " +
          describe_site("__syncthreads()", b.bar_file, b.bar_line) +
          "; every thread of a block must reach each block barrier");
  }
  check_block_deadlock(b, l, counts);
  const bool last = exited_of(counts) == b.nthreads;
  const uint64_t epoch = b.epoch;  // read under mu: the last thread may reset the block right after
  lock.unlock();
  if (last) {
    std::lock_guard<std::mutex> grid_lock(l.grid_mu);
    ++l.grid_blocks_exited;
    if (l.grid_arrived > 0) {
      l.grid_cv.notify_all();
      // grid_mu is released when fault() unwinds this scope.
      fault("every thread of the block exited while " + std::to_string(l.grid_arrived) +
            " block(s) wait at " + describe_site("grid.sync()", l.grid_file, l.grid_line) +
            ": a grid barrier needs every thread of the grid");
    }
  }
  return ExitInfo{last, epoch};
}

inline void poison_dynamic_smem(BlockState& b) {
  if (b.dynamic_smem_bytes > 0) std::memset(b.dynamic_smem.get(), 0xFF, b.dynamic_smem_bytes);
}

// Prepares a block for (re)use: no thread exited or waiting, fresh poisoned shared memory.
inline void reset_block(BlockState& b, const Launch& l) {
  b.counts.store(0, std::memory_order_relaxed);
  b.bar_arrived = 0;
  b.bar_true_count = 0;
  for (size_t warp = 0; warp < b.warps.size(); ++warp) {
    const int lanes = std::min(32, b.nthreads - static_cast<int>(warp) * 32);
    b.warps[warp].live = lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
    for (auto& s : b.warps[warp].slots) s->in_use = false;
  }
  for (int tid = 0; tid < b.nthreads; ++tid) b.waits[tid].clear();
  poison_dynamic_smem(b);
  (void)l;
}

inline std::unique_ptr<BlockState> make_block(const Launch& l) {
  auto b = std::make_unique<BlockState>();
  b->nthreads = l.threads_per_block;
  b->warps = std::vector<WarpState>(static_cast<size_t>((l.threads_per_block + 31) / 32));
  b->waits = std::make_unique<WaitSlot[]>(static_cast<size_t>(l.threads_per_block));
  b->dynamic_smem_bytes = l.dynamic_smem_bytes;
  b->dynamic_smem.reset(
      static_cast<std::byte*>(::operator new[](l.dynamic_smem_bytes, kSmemAlignment)));
  reset_block(*b, l);
  return b;
}

// Whether [p, p + bytes) lies in this block's dynamic shared memory: what .shared operands
// (cp.async's destination, ldmatrix's rows) must address. A GPU faults on a generic address
// outside the shared window, or silently reads another part of the block's shared memory.
inline bool in_dynamic_smem(const BlockState& b, const void* p, size_t bytes) {
  const auto* base = reinterpret_cast<const std::byte*>(b.dynamic_smem.get());
  const auto* q = static_cast<const std::byte*>(p);
  return q >= base && bytes <= b.dynamic_smem_bytes &&
         static_cast<size_t>(q - base) <= b.dynamic_smem_bytes - bytes;
}

inline bool static_shared_allowed(const char* file, int line) {
  ThreadContext& t = tls_context;
  if (t.launch != nullptr && t.launch->blocks_concurrent) {
    fault("static __shared__ variable declared at " + describe_site("", file, static_cast<unsigned>(line)) +
          " in a cooperative launch of " + std::to_string(t.launch->num_blocks) +
          " blocks: the emulator runs those blocks at once and they would share one copy; use "
          "FUSEDRNN_DYNAMIC_SMEM (dynamic shared memory) in cooperative kernels");
  }
  return true;
}

}  // namespace detail

// This block's dynamic shared memory (the launch's dynamic_smem bytes, 128-byte aligned, poisoned
// with 0xFF bytes at block start so that reads before writes show up as NaN). Each block of a
// cooperative launch has its own buffer. Reached from kernels through FUSEDRNN_DYNAMIC_SMEM.
inline unsigned char* dynamic_shared_memory() {
  detail::ThreadContext& t = detail::context_or_fault("dynamic shared memory");
  return reinterpret_cast<unsigned char*>(t.block->dynamic_smem.get());
}

}  // namespace emu
