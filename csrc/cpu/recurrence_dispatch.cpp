// Picks the instruction set, checks what only the CPU can check, carves the workspace per
// direction and runs the directions on teams of the persistent thread pool.
#include "recurrence.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "cpu_caches.h"
#include "recurrence_isa.h"
#include "row_groups.h"
#include "thread_team.h"

namespace fusedrnn::cpu {

namespace {

struct IsaOps {
  const char* name;
  int64_t (*forward_bytes)(const RecurrenceFwdParams&);
  int64_t (*backward_bytes)(const RecurrenceBwdParams&);
  int (*forward_threads)(const RecurrenceFwdParams&);
  int (*backward_threads)(const RecurrenceBwdParams&);
  void (*forward_direction)(const RecurrenceFwdParams&, const Team&);
  void (*backward_direction)(const RecurrenceBwdParams&, const Team&);
  void (*cell_step_forward)(const CellStepFwdParams&, int64_t, int64_t);
  void (*cell_step_backward)(const CellStepBwdParams&, int64_t, int64_t);
};

#define FUSEDRNN_ISA_OPS(isa)                                                                  \
  IsaOps {                                                                                     \
    #isa, isa::forward_workspace_bytes, isa::backward_workspace_bytes, isa::forward_max_threads, \
        isa::backward_max_threads, isa::forward_direction, isa::backward_direction,            \
        isa::cell_step_forward, isa::cell_step_backward                                        \
  }

// Ranks: a CPU that can run a build can run every build of a lower rank. -1: no such build.
int isa_rank(const char* name) {
  if (std::strcmp(name, "amx") == 0) return 4;
  if (std::strcmp(name, "avx512bf16") == 0) return 3;
  if (std::strcmp(name, "avx512") == 0) return 2;
  if (std::strcmp(name, "avx2") == 0) return 1;
  if (std::strcmp(name, "generic") == 0) return 0;
  return -1;
}

// AMX-BF16 and AMX-TILE in cpuid and the tile state enabled by the OS (XCR0 bits 17 and 18).
// Whether Linux also grants this process the tile state is asked only when a bfloat16 layer is
// about to use the tiles (amx_tiles.h, amx_tiles_granted): the grant changes the process (larger
// signal frames, a larger minimum sigaltstack), which a program with no bfloat16 layer should
// not pay for. The AMX build runs float layers exactly as the avx512 build does.
bool amx_usable() {
#if defined(FUSEDRNN_CPU_HAS_AMX_BUILD) && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1u)) return false;  // OSXSAVE
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  constexpr uint32_t kTileState = (1u << 17) | (1u << 18);  // XTILECFG, XTILEDATA
  return (xcr0_lo & kTileState) == kTileState;
#else
  return false;
#endif
}

// AVX512-BF16 in cpuid (leaf 7, sub-leaf 1, EAX bit 5), where this build has its kernel.
bool avx512bf16_usable() {
#if defined(FUSEDRNN_CPU_HAS_AVX512BF16_BUILD)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u);
#else
  return false;
#endif
}

int supported_rank() {
#if defined(__x86_64__)
  static const int rank = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("fma")) {
      return amx_usable() ? 4 : avx512bf16_usable() ? 3 : 2;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return rank;
#else
  return 0;
#endif
}

// The best supported ISA, lowered by FUSEDRNN_CPU_ISA (read at every call, so tests can switch).
IsaOps ops() {
  int rank = supported_rank();
  if (const char* want = std::getenv("FUSEDRNN_CPU_ISA")) {
    if (*want) {
      const int wanted = isa_rank(want);
      if (wanted < 0) {
        throw std::invalid_argument(
            std::string("FUSEDRNN_CPU_ISA must be generic, avx2, avx512, avx512bf16 or amx, got '") +
            want + "'");
      }
      if (wanted < rank) rank = wanted;
    }
  }
#if defined(__x86_64__)
#if defined(FUSEDRNN_CPU_HAS_AMX_BUILD)
  if (rank == 4) return FUSEDRNN_ISA_OPS(amx);
#endif
#if defined(FUSEDRNN_CPU_HAS_AVX512BF16_BUILD)
  // An AMX CPU has AVX512-BF16 too; without the avx512bf16 build, rank 3 runs avx512 below.
  if (rank >= 3) return FUSEDRNN_ISA_OPS(avx512bf16);
#endif
  if (rank >= 2) return FUSEDRNN_ISA_OPS(avx512);
  if (rank == 1) return FUSEDRNN_ISA_OPS(avx2);
#endif
  return FUSEDRNN_ISA_OPS(generic);
}

// After a call whose barriers stalled, the next calls run without per-step barriers; the
// pause doubles with every stalled retry (up to kMaxBackoffCalls) and resets after a clean one,
// so an oversubscribed machine pays for a stalled call rarely and a quiet one not at all.
// A call counts as stalled when its stalled waits add up to more than 1/kStalledShareDivisor of
// its wall time. Measured on the 2-core VM (LSTM B=64 H=256 T=100 forward, two threads): a
// quiet machine loses up to ~16% of a call that way (bursts of host noise; once in 300 calls
// over 25%), an oversubscribed one (a busy process on one core) mostly 30-58%. The earlier
// rule, more than 2 + T/16 stalled waits, confused the two: quiet calls had up to 17 such waits
// and oversubscribed ones 5-9, so a quiet machine dropped to one thread for 16 calls about once
// in 100 calls (forward 36 against 25 ms), and an oversubscribed one mostly kept its team
// (50-68 ms a call, against ~37 on one thread, which it now gets). The shortest pause is small
// because a rare false alarm should cost little; a real oversubscription doubles it quickly.
constexpr int64_t kStalledShareDivisor = 3;
constexpr int kMinBackoffCalls = 4;
constexpr int kMaxBackoffCalls = 4096;
std::atomic<int> g_stall_backoff{0};
std::atomic<int> g_next_backoff{kMinBackoffCalls};

// Below this many multiply-adds per step and direction, a second thread costs about as much as it
// saves. Measured on the 2-core SPR VM (AVX-512, fp32, B=1, 100 steps): LSTM H=64 (16K MACs)
// 73 us on 1 thread, 66 on 2 in a loop of back-to-back calls, but 124 against 244 us when the
// call comes after 0.5 ms idle (waking the sleeping OpenMP worker costs ~100 us on this VM, which
// a call this short cannot win back); LSTM H=128 (64K) 220 -> 158 us, and no idle penalty
// (torch's input-projection GEMM before it has woken the worker already).
constexpr int64_t kMinMacsPerStepForThreads = 32 * 1024;


template <typename Params>
int64_t macs_per_step(const Params& p) {
  return p.batch * gate_count(p.cell) * p.hidden * p.state;
}

template <typename Params>
void check_lengths(const Params& p) {
  if (p.lengths == nullptr) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = p.lengths[b];
    if (n < 1 || n > p.seq_len) {
      throw std::invalid_argument("fusedrnn: lengths[" + std::to_string(b) + "] must be in [1, " +
                                  std::to_string(p.seq_len) + "], got " + std::to_string(n));
    }
  }
}

// How a direction's threads share its work. A team splits the hidden units (each thread packs
// and streams its share of W_hh; h_t is shared, one barrier per step). Row groups split the
// batch rows (row_groups.h): each thread runs the whole recurrence of its rows alone, with no
// barrier and nothing shared but the weights, at the price of a copy of all of W_hh per thread.
// Row groups win when each thread has enough rows and its copy of W_hh streams fast enough
// (row_group_weights_fit).
// Measured on the 2-core SPR VM, fp32, two threads, team against row groups (A/B pairs):
// LSTM H=256 (W_hh 1 MB) T=100 B=64 native forward 16.6-17.5 -> 13.7-13.9 ms; B=256 T=50
// 34.5 -> 29.8; whole training calls LSTM B=64 T=200 191-209 -> 178-180 ms, GRU B=64 T=100
// 77-80 -> 66-67, Elman B=64 25-26 -> 21-22. At 8 rows a thread (B=16) both were even, and
// with H=512 (4 MB, streamed from L3 by each thread) the team was faster (estimated as two
// one-thread processes running half the batch each).
// The backward wins from fewer rows a thread than the forward: LSTM H=256 T=100 backward B=8
// 2.6 -> 1.8 ms, GRU B=8 4.1 -> 3.2, GRU H=128 B=6 1.4 -> 1.05, LSTM B=4 1.42 -> 1.54
// (worse); forward inference at 8 rows a thread went either way (B=16 3.35 -> 3.6 ms, B=8
// 1.98 -> 1.83).
constexpr int64_t kMinRowsPerThreadForRowGroupsForward = 16;
constexpr int64_t kMinRowsPerThreadForRowGroupsBackward = 3;

// Whether `threads` row groups may each read their own copy of the recurrent weights (W_hh, and
// W_hr with a projection), `bytes` of them packed. Everywhere: up to half of a core's L2, so
// that they stay there next to the group's rows. 2 MB L2 on the SPR VM measured above: 1 MB
// (LSTM H=256 fp32) won, 4 MB lost (estimated). On AMD, also while all the copies take at most
// half of the L3 the threads share: each thread streams its copy from L3 at every step, and
// Zen's L3 keeps up. Measured on the 2-core Zen 4 VM (1 MB L2, 32 MB L3), fp32, two threads,
// team against row groups in the same process: LSTM inference T=100 B=32 H=256 (1 MB) 20.8 ->
// 18.8 ms, B=64 H=256 40.0 -> 36.1, B=64 H=512 (4 MB) 166 -> 144, B=32 H=512 81 -> 70;
// training B=64 T=50 H=256 72 -> 59, H=512 248 -> 213; but B=64 H=1024 (16 MB: the two copies
// fill the L3) 107 -> 127.
bool row_group_weights_fit(int64_t bytes, int threads) {
  if (bytes <= l2_bytes() / 2) return true;
  return is_amd() && l3_bytes() > 0 && bytes * threads <= l3_bytes() / 2;
}

// Test-only knobs, read once per call (getenv scans the environment):
// FUSEDRNN_CPU_TEST_THREADS=n runs every direction on exactly n threads, 1 <= n <= 64 (ignoring
// the core count and the size heuristic), so that small test shapes exercise uneven splits; a
// value outside that range or not a number is refused (n = 1000000 crashed the process: review,
// session 29);
// FUSEDRNN_CPU_TEST_SPLIT=rows or units forces the split of every direction with more than one
// thread.
constexpr long kMaxTestThreads = 64;

struct TestKnobs {
  enum Split { kAny, kRows, kUnits };
  int threads = 0;
  Split split = kAny;

  static TestKnobs read() {
    TestKnobs knobs;
    if (const char* v = std::getenv("FUSEDRNN_CPU_TEST_THREADS"); v && *v) {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      if (*end != '\0' || n < 1 || n > kMaxTestThreads) {
        throw std::invalid_argument(
            std::string("FUSEDRNN_CPU_TEST_THREADS must be a whole number from 1 to ") +
            std::to_string(kMaxTestThreads) + ", got '" + v + "'");
      }
      knobs.threads = static_cast<int>(n);
    }
    if (const char* v = std::getenv("FUSEDRNN_CPU_TEST_SPLIT"); v && *v) {
      if (std::strcmp(v, "rows") == 0) {
        knobs.split = kRows;
      } else if (std::strcmp(v, "units") == 0) {
        knobs.split = kUnits;
      } else {
        throw std::invalid_argument(
            std::string("FUSEDRNN_CPU_TEST_SPLIT must be rows or units, got '") + v + "'");
      }
    }
    return knobs;
  }
};

template <typename Params>
bool splits_rows(const Params& p, int threads, const TestKnobs& knobs) {
  if (threads < 2) return false;
  if (knobs.split != TestKnobs::kAny) return knobs.split == TestKnobs::kRows;
  const int64_t weights = gate_count(p.cell) * p.hidden * p.state +
                          (p.state != p.hidden ? p.state * p.hidden : 0);
  const int64_t min_rows = std::is_same_v<Params, RecurrenceBwdParams>
                               ? kMinRowsPerThreadForRowGroupsBackward
                               : kMinRowsPerThreadForRowGroupsForward;
  // Each group packs its copy in the compute type (float for bfloat16 tensors).
  const int64_t packed_bytes = p.dtype == DType::kFloat64 ? 8 : 4;
  return p.batch >= min_rows * threads && row_group_weights_fit(weights * packed_bytes, threads);
}

// Thread `rank` of `threads` row groups: its rows [b0, b1) as a problem of its own, with its
// slice of the direction's workspace (the groups' workspaces follow each other).
template <typename Params, typename BytesFn>
Params row_group(const Params& p, int rank, int threads, BytesFn bytes_of) {
  char* workspace = static_cast<char*>(p.workspace);
  int64_t b0 = 0, b1 = 0;
  for (int g = 0; g <= rank; ++g) {
    split_range(p.batch, g, threads, b0, b1);
    if (g < rank && b1 > b0) workspace += bytes_of(rows_of(p, b0, b1));
  }
  Params q = rows_of(p, b0, b1);
  q.workspace = workspace;
  q.workspace_bytes = b1 > b0 ? bytes_of(q) : 0;
  return q;
}

// Workspace of a direction run by `threads` threads: a team's, or the sum of the row groups'
// (at least the former: the carve must also serve a team, run_directions' fallback).
template <typename Params, typename BytesFn>
int64_t direction_bytes(const Params& p, int threads, const TestKnobs& knobs, BytesFn bytes_of) {
  const int64_t team = bytes_of(p);
  if (!splits_rows(p, threads, knobs)) return team;
  int64_t groups = 0;
  for (int g = 0; g < threads; ++g) {
    int64_t b0, b1;
    split_range(p.batch, g, threads, b0, b1);
    if (b1 > b0) groups += bytes_of(rows_of(p, b0, b1));
  }
  return groups > team ? groups : team;
}

// Threads per direction: {first, second}; second == 0 when one team runs the directions one
// after the other. Without back-off this is what the workspace is sized for.
template <typename Params, typename ThreadsFn>
std::pair<int, int> plan_threads(const std::vector<Params>& dirs, ThreadsFn threads_of,
                                 const TestKnobs& knobs, bool backing_off) {
  int64_t want = 1;
  for (const auto& p : dirs) want = want > p.num_threads ? want : p.num_threads;
  int threads = static_cast<int>(want < available_cpus() ? want : available_cpus());
  const int forced = knobs.threads;
  if (forced > 0) threads = 2 * forced;
  auto useful = [&](const Params& p, int budget) {
    if (forced > 0) return forced;
    if (backing_off || macs_per_step(p) < kMinMacsPerStepForThreads) return 1;
    const int most = splits_rows(p, budget, knobs) ? budget : threads_of(p);
    return budget < most ? budget : most;
  };
  if (dirs.size() == 1 || (threads < 2 && forced == 0)) {
    return {dirs.size() == 1 ? useful(dirs[0], threads) : 1, 0};
  }
  return {useful(dirs[0], (threads + 1) / 2), useful(dirs[1], threads / 2)};
}

// Workspace of each direction under a plan (plan_threads' pair).
template <typename Params, typename BytesFn>
std::vector<int64_t> planned_bytes(const std::vector<Params>& dirs, std::pair<int, int> plan,
                                   const TestKnobs& knobs, BytesFn bytes_of) {
  std::vector<int64_t> bytes(dirs.size());
  for (size_t d = 0; d < dirs.size(); ++d) {
    const int threads = plan.second == 0 || d == 0 ? plan.first : plan.second;
    bytes[d] = direction_bytes(dirs[d], threads, knobs, bytes_of);
  }
  return bytes;
}

int64_t sum(const std::vector<int64_t>& values) {
  int64_t total = 0;
  for (const int64_t v : values) total += v;
  return total;
}

template <typename Params, typename BytesFn, typename ThreadsFn>
int64_t workspace_bytes(const std::vector<Params>& dirs, BytesFn bytes_of, ThreadsFn threads_of) {
  const TestKnobs knobs = TestKnobs::read();
  return sum(planned_bytes(dirs, plan_threads(dirs, threads_of, knobs, false), knobs, bytes_of));
}

template <typename Params, typename BytesFn, typename ThreadsFn, typename RunFn>
void run_directions(const std::vector<Params>& dirs, BytesFn bytes_of, ThreadsFn threads_of,
                    RunFn run) {
  check_lengths(dirs[0]);
  TestKnobs knobs = TestKnobs::read();
  // The workspace is carved as workspace_bytes() sized it: by the plan without back-off.
  const auto planned = plan_threads(dirs, threads_of, knobs, false);
  std::vector<Params> local = dirs;
  std::vector<int64_t> own = planned_bytes(dirs, planned, knobs, bytes_of);
  int64_t total = sum(own);
  if (dirs[0].workspace_bytes < total && knobs.split != TestKnobs::kRows) {
    // A workspace sized for fewer row groups (another thread count, or a CPU affinity changed
    // since): the threads split the units instead, which needs no more than one thread does.
    knobs.split = TestKnobs::kUnits;
    own = planned_bytes(dirs, planned, knobs, bytes_of);
    total = sum(own);
  }
  for (size_t d = 0; d < local.size(); ++d) {
    if (dirs[d].workspace_bytes < total) {
      throw std::invalid_argument("fusedrnn: direction " + std::to_string(d) + ": workspace_bytes " +
                                  std::to_string(dirs[d].workspace_bytes) + " is too small, need " +
                                  std::to_string(total));
    }
  }
  int64_t offset = 0;
  for (size_t d = 0; d < local.size(); ++d) {
    local[d].workspace = static_cast<char*>(local[d].workspace) + offset;
    local[d].workspace_bytes = own[d];
    offset += own[d];
  }

  // After a call whose barriers stalled (a team member lost its core: the machine is
  // oversubscribed), run the next calls without per-step barriers: one thread per direction.
  const int forced = knobs.threads;
  const bool backing_off = forced == 0 && g_stall_backoff.load(std::memory_order_relaxed) > 0;
  if (backing_off) g_stall_backoff.fetch_sub(1, std::memory_order_relaxed);
  const auto [team0, team1] = backing_off ? plan_threads(dirs, threads_of, knobs, true) : planned;

  // A wait counts as a stall past half of a thread's share of a step (estimated at 40K
  // multiply-adds per microsecond), at least 50 us and at most 1 ms (a descheduled member loses
  // its core for a scheduler slice, milliseconds). With a fixed 50 us, large steps (LSTM H=1024
  // B=64: ~3 ms per step) counted ordinary imbalance as stalls and fell back to one thread.
  auto stall_micros = [&](const Params& p, int team) {
    const int64_t us = macs_per_step(p) / (team > 0 ? team : 1) / 40000 / 2;
    return us < 50 ? int64_t(50) : (us > 1000 ? int64_t(1000) : us);
  };
  // The row groups direction d was planned with (0: its team splits the units). A row's sums
  // depend on the rows it is blocked with (the micro-kernel's tail blocks accumulate in another
  // order), so a call that gets fewer threads than planned (back-off, nested parallelism, an
  // OpenMP thread limit) still runs these groups, one after the other:
  // its results are the planned split's, bit for bit, whatever threads it got. (A team's split
  // of the units leaves every sum's order as it is.)
  auto planned_groups = [&](size_t d) {
    const int threads = planned.second == 0 || d == 0 ? planned.first : planned.second;
    return splits_rows(local[d], threads, knobs) ? threads : 0;
  };
  // Member `rank` of the `threads` threads of direction d: a member of its team, or the runner
  // of row groups rank, rank + threads, ...
  auto run_member = [&](size_t d, int rank, int threads, SpinBarrier* barrier) {
    const Params& p = local[d];
    const int groups = planned_groups(d);
    if (groups == 0) {
      run(p, Team{rank, threads, barrier});
      return;
    }
    for (int g = rank; g < groups; g += threads) {
      const Params rows = row_group(p, g, groups, bytes_of);
      if (rows.batch > 0) run(rows, Team{0, 1, nullptr});
    }
  };
  auto execute = [&](int threads0, int threads1) {
    SpinBarrier barrier0(threads0, stall_micros(local[0], threads0)),
        barrier1(threads1 > 0 ? threads1 : 1, stall_micros(local.back(), threads1));
    // Only a team of more than one thread can stall, and back off (forced teams never do): the
    // clock is read for those calls only.
    const bool watched = (threads0 > 1 || threads1 > 1) && forced == 0;
    const auto start = watched ? std::chrono::steady_clock::now()
                               : std::chrono::steady_clock::time_point();
    const bool ran = parallel_run(threads0 + threads1, [&](int rank) {
      if (threads1 == 0) {
        for (size_t d = 0; d < local.size(); ++d) run_member(d, rank, threads0, &barrier0);
      } else if (rank < threads0) {
        run_member(0, rank, threads0, &barrier0);
      } else {
        run_member(1, rank - threads0, threads1, &barrier1);
      }
    });
    if (ran && watched) {
      const int64_t wall = std::chrono::duration_cast<std::chrono::microseconds>(
                               std::chrono::steady_clock::now() - start).count();
      const int64_t lost = barrier0.stalled_micros() + barrier1.stalled_micros();
      if (lost * kStalledShareDivisor > wall) {
        const int pause = g_next_backoff.load(std::memory_order_relaxed);
        g_stall_backoff.store(pause, std::memory_order_relaxed);
        g_next_backoff.store(pause * 2 < kMaxBackoffCalls ? pause * 2 : kMaxBackoffCalls,
                             std::memory_order_relaxed);
      } else {
        g_next_backoff.store(kMinBackoffCalls, std::memory_order_relaxed);
      }
    }
    return ran;
  };

  if (!execute(team0, team1)) execute(1, 0);  // no threads to be had (nested parallelism)
}

}  // namespace

std::string active_isa() { return ops().name; }

int64_t forward_workspace_bytes(const std::vector<RecurrenceFwdParams>& dirs) {
  const IsaOps o = ops();
  return workspace_bytes(dirs, o.forward_bytes, o.forward_threads);
}

int64_t backward_workspace_bytes(const std::vector<RecurrenceBwdParams>& dirs) {
  const IsaOps o = ops();
  return workspace_bytes(dirs, o.backward_bytes, o.backward_threads);
}

void forward(const std::vector<RecurrenceFwdParams>& dirs) {
  const IsaOps o = ops();
  run_directions(dirs, o.forward_bytes, o.forward_threads, o.forward_direction);
}

void backward(const std::vector<RecurrenceBwdParams>& dirs) {
  const IsaOps o = ops();
  run_directions(dirs, o.backward_bytes, o.backward_threads, o.backward_direction);
}

namespace {

// (row, unit) pairs per thread at least: below, a thread's share is a few microseconds, less
// than what handing it to another thread costs.
constexpr int64_t kMinCellStepElementsForThreads = 8 * 1024;

void require(const void* pointer, const char* name, const char* when) {
  if (pointer == nullptr) {
    throw std::invalid_argument(std::string("fusedrnn: cell step: ") + name + " must not be null " +
                                when);
  }
}

void check_cell_step_shape(const CellStepShape& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64 && p.dtype != DType::kBFloat16) {
    throw std::invalid_argument(
        "fusedrnn: cell step: dtype must be float32, float64 or bfloat16 on the CPU");
  }
  if (!is_cell_code(static_cast<int32_t>(p.cell))) {
    throw std::invalid_argument("fusedrnn: cell step: unknown cell code " +
                                std::to_string(static_cast<int>(p.cell)));
  }
  if (p.batch < 1 || p.hidden < 1) {
    throw std::invalid_argument("fusedrnn: cell step: batch and hidden must be >= 1, got " +
                                std::to_string(p.batch) + " and " + std::to_string(p.hidden));
  }
}

// Rows split in contiguous blocks over the useful threads (rows are independent).
template <typename Params, typename Fn>
void run_rows(const Params& p, Fn fn) {
  const int64_t most = p.batch * p.hidden / kMinCellStepElementsForThreads;
  int64_t threads = p.num_threads < available_cpus() ? p.num_threads : available_cpus();
  threads = threads < most ? threads : most;
  threads = threads < p.batch ? threads : p.batch;
  const int n = threads > 1 ? static_cast<int>(threads) : 1;
  auto rows = [&](int rank) {
    int64_t begin, end;
    split_range(p.batch, rank, n, begin, end);
    fn(p, begin, end);
  };
  // Nested parallelism gives no threads: then one thread does every row.
  if (!parallel_run(n, rows)) fn(p, 0, p.batch);
}

}  // namespace

void cell_step_forward(const CellStepFwdParams& p) {
  check_cell_step_shape(p);
  const bool lstm = has_cell_state(p.cell), gru = p.cell == CellKind::kGru;
  if (p.xpre == nullptr) {  // the pass forms the products
    require(p.x, "x", "without xpre");
    require(p.w_ih, "w_ih", "without xpre");
    if (p.h_prev) require(p.w_hh, "w_hh", "without xpre when h_prev is given");
    if (p.input_size < 1 || (p.w_hh && p.state < 1)) {
      throw std::invalid_argument("fusedrnn: cell step: input_size (and state, with w_hh) must be "
                                  ">= 1 without xpre, got " + std::to_string(p.input_size) +
                                  " and " + std::to_string(p.state));
    }
    if (gru && p.state != p.hidden) {
      throw std::invalid_argument("fusedrnn: cell step: a GRU's state must equal hidden, got " +
                                  std::to_string(p.state) + " and " + std::to_string(p.hidden));
    }
  } else {
    if (p.x || p.w_ih || p.w_hh) {  // one mode or the other, never a product counted twice
      throw std::invalid_argument(
          "fusedrnn: cell step: x, w_ih and w_hh must be null when xpre is given");
    }
    if (gru) require(p.hpre, "hpre", "for a GRU given xpre");
  }
  require(p.h, "h", "");
  if (lstm) require(p.c, "c", "for an LSTM");
  if (!lstm && p.peephole) {
    throw std::invalid_argument("fusedrnn: cell step: peephole must be null but for an LSTM");
  }
  if (gru) require(p.h_prev, "h_prev", "for a GRU");
  run_rows(p, ops().cell_step_forward);
}

void cell_step_backward(const CellStepBwdParams& p) {
  check_cell_step_shape(p);
  const bool lstm = has_cell_state(p.cell), gru = p.cell == CellKind::kGru;
  require(p.d_xpre, "d_xpre", "");
  if (!lstm && p.peephole) {
    throw std::invalid_argument("fusedrnn: cell step: peephole must be null but for an LSTM");
  }
  if (lstm) {
    require(p.gates, "gates", "for an LSTM");
    require(p.c, "c", "for an LSTM");
    require(p.d_c_prev, "d_c_prev", "for an LSTM");
  } else if (gru) {
    require(p.gates, "gates", "for a GRU");
    require(p.h_prev, "h_prev", "for a GRU");
    require(p.d_hpre, "d_hpre", "for a GRU");
    require(p.d_h_prev, "d_h_prev", "for a GRU");
  } else {
    require(p.h, "h", "for an Elman RNN");
  }
  run_rows(p, ops().cell_step_backward);
}

}  // namespace fusedrnn::cpu
