// Device intrinsics on CPU threads: block barriers, warp shuffles and votes (with the PTX lane
// semantics), atomics, fences, cache-hinted loads and bit/float helpers.
//
// Barrier and warp intrinsics take a defaulted std::source_location so that fault reports name the
// call site in the kernel source; call them exactly as in CUDA.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <thread>
#include <type_traits>

#include "emu_engine.h"

// ---------------------------------------------------------------- block barriers
inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  emu::detail::block_barrier(emu::detail::BarrierKind::kSync, 0, "__syncthreads()", loc);
}
inline int __syncthreads_count(int predicate,
                               const std::source_location loc = std::source_location::current()) {
  return emu::detail::block_barrier(emu::detail::BarrierKind::kSyncCount, predicate,
                                    "__syncthreads_count()", loc);
}
inline int __syncthreads_and(int predicate,
                             const std::source_location loc = std::source_location::current()) {
  return emu::detail::block_barrier(emu::detail::BarrierKind::kSyncAnd, predicate,
                                    "__syncthreads_and()", loc);
}
inline int __syncthreads_or(int predicate,
                            const std::source_location loc = std::source_location::current()) {
  return emu::detail::block_barrier(emu::detail::BarrierKind::kSyncOr, predicate,
                                    "__syncthreads_or()", loc);
}

// ---------------------------------------------------------------- warp shuffles
namespace emu::detail {

// The source lane of shfl.sync as the PTX ISA defines it, with CUDA's c operand
// ((32 - width) << 8 | 0x1f, or without 0x1f for .up): a lane reads its own value when the
// source falls outside its segment (up, down) or above it (bfly); idx wraps within the segment.
inline int shfl_source_lane(WarpOp op, int lane, unsigned b, int width) {
  const int bval = static_cast<int>(b & 31u);
  const int segmask = (32 - width) & 0x1f;
  const int cval = op == WarpOp::kShflUp ? 0 : 0x1f;
  const int max_lane = (lane & segmask) | (cval & ~segmask);
  const int min_lane = lane & segmask;
  int source = lane;
  bool valid = false;
  switch (op) {
    case WarpOp::kShflUp: source = lane - bval; valid = source >= max_lane; break;
    case WarpOp::kShflDown: source = lane + bval; valid = source <= max_lane; break;
    case WarpOp::kShflXor: source = lane ^ bval; valid = source <= max_lane; break;
    default: source = min_lane | (bval & ~segmask); valid = source <= max_lane; break;
  }
  return valid ? source : lane;
}

template <class T>
inline T shuffle(WarpOp op, unsigned mask, T var, unsigned b, int width, const char* what,
                 const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    context_or_fault(what);
    fault(describe_site(what, loc.file_name(), loc.line()) + " with width " +
          std::to_string(width) + ": width must be a power of two in [1, 32]");
  }
  uint32_t words[2] = {0, 0};
  std::memcpy(words, &var, sizeof(T));
  T result;
  const int lane = tls_context.lane;
  warp_exchange(op, width, mask, words, 2, what, loc, [&](const WarpSlot& slot) {
    const int source = shfl_source_lane(op, lane, b, width);
    if (slot.arrived & (1u << source)) {
      std::memcpy(&result, slot.words[source], sizeof(T));
    } else {
      // Reading a lane that does not take part is undefined on the GPU: poison (NaN / -1).
      std::memset(&result, 0xFF, sizeof(T));
    }
  });
  return result;
}

enum VoteKind : int { kBallot = 0, kAny = 1, kAll = 2 };

inline unsigned vote(VoteKind kind, unsigned mask, int predicate, const char* what,
                     const std::source_location& loc) {
  const uint32_t word = predicate != 0;
  unsigned ballot = 0, participants = 0;
  warp_exchange(WarpOp::kVote, kind, mask, &word, 1, what, loc, [&](const WarpSlot& slot) {
    participants = slot.arrived;
    for (int lane = 0; lane < 32; ++lane) {
      if ((slot.arrived >> lane & 1u) && slot.words[lane][0]) ballot |= 1u << lane;
    }
  });
  switch (kind) {
    case kAny: return ballot != 0;
    case kAll: return ballot == participants;
    default: return ballot;
  }
}

enum ReduceKind : int { kRedAdd = 0, kRedMin, kRedMax, kRedAnd, kRedOr, kRedXor, kRedMinSigned,
                        kRedMaxSigned };

inline unsigned warp_reduce(ReduceKind kind, unsigned mask, unsigned value, const char* what,
                            const std::source_location& loc) {
  unsigned result = 0;
  warp_exchange(WarpOp::kReduce, kind, mask, &value, 1, what, loc, [&](const WarpSlot& slot) {
    bool first = true;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(slot.arrived >> lane & 1u)) continue;
      const unsigned v = slot.words[lane][0];
      if (first) {
        result = v;
        first = false;
        continue;
      }
      switch (kind) {
        case kRedAdd: result += v; break;
        case kRedMin: result = std::min(result, v); break;
        case kRedMax: result = std::max(result, v); break;
        case kRedAnd: result &= v; break;
        case kRedOr: result |= v; break;
        case kRedXor: result ^= v; break;
        case kRedMinSigned:
          result = static_cast<unsigned>(std::min(static_cast<int>(result), static_cast<int>(v)));
          break;
        case kRedMaxSigned:
          result = static_cast<unsigned>(std::max(static_cast<int>(result), static_cast<int>(v)));
          break;
      }
    }
  });
  return result;
}

}  // namespace emu::detail

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                     const std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::WarpOp::kShflIdx, mask, var,
                              static_cast<unsigned>(srcLane), width, "__shfl_sync()", loc);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::WarpOp::kShflUp, mask, var, delta, width,
                              "__shfl_up_sync()", loc);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::WarpOp::kShflDown, mask, var, delta, width,
                              "__shfl_down_sync()", loc);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         const std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::WarpOp::kShflXor, mask, var,
                              static_cast<unsigned>(laneMask), width, "__shfl_xor_sync()", loc);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location loc = std::source_location::current()) {
  return emu::detail::vote(emu::detail::kBallot, mask, predicate, "__ballot_sync()", loc);
}
inline int __any_sync(unsigned mask, int predicate,
                      const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(emu::detail::vote(emu::detail::kAny, mask, predicate, "__any_sync()", loc));
}
inline int __all_sync(unsigned mask, int predicate,
                      const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(emu::detail::vote(emu::detail::kAll, mask, predicate, "__all_sync()", loc));
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu,
                       const std::source_location loc = std::source_location::current()) {
  emu::detail::warp_exchange(emu::detail::WarpOp::kSyncWarp, 0, mask, nullptr, 0, "__syncwarp()",
                             loc, [](const emu::detail::WarpSlot&) {});
}

// __match_any_sync: the participating lanes whose value has the same bits as this lane's.
// __match_all_sync: the participating lanes if all values are equal (*pred = 1), else 0.
namespace emu::detail {
template <class T>
inline unsigned match(bool all, unsigned mask, T value, int* pred, const char* what,
                      const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "__match_*_sync compares values of at most 8 bytes");
  uint32_t words[2] = {0, 0};
  std::memcpy(words, &value, sizeof(T));
  const int lane = context_or_fault(what).lane;
  unsigned same = 0, participants = 0;
  warp_exchange(WarpOp::kMatchAny, all ? 1 : 0, mask, words, 2, what, loc,
                [&](const WarpSlot& slot) {
                  participants = slot.arrived;
                  for (int other = 0; other < 32; ++other) {
                    if ((slot.arrived >> other & 1u) &&
                        slot.words[other][0] == slot.words[lane][0] &&
                        slot.words[other][1] == slot.words[lane][1]) {
                      same |= 1u << other;
                    }
                  }
                });
  if (!all) return same;
  const bool equal = same == participants;
  if (pred != nullptr) *pred = equal ? 1 : 0;
  return equal ? participants : 0u;
}
}  // namespace emu::detail

template <class T>
inline unsigned __match_any_sync(unsigned mask, T value,
                                 const std::source_location loc = std::source_location::current()) {
  return emu::detail::match(false, mask, value, nullptr, "__match_any_sync()", loc);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred,
                                 const std::source_location loc = std::source_location::current()) {
  return emu::detail::match(true, mask, value, pred, "__match_all_sync()", loc);
}

inline unsigned __reduce_add_sync(unsigned mask, unsigned value,
                                  const std::source_location loc = std::source_location::current()) {
  return emu::detail::warp_reduce(emu::detail::kRedAdd, mask, value, "__reduce_add_sync()", loc);
}
inline int __reduce_add_sync(unsigned mask, int value,
                             const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(emu::detail::warp_reduce(emu::detail::kRedAdd, mask,
                                                   static_cast<unsigned>(value),
                                                   "__reduce_add_sync()", loc));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value,
                                  const std::source_location loc = std::source_location::current()) {
  return emu::detail::warp_reduce(emu::detail::kRedMin, mask, value, "__reduce_min_sync()", loc);
}
inline int __reduce_min_sync(unsigned mask, int value,
                             const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(emu::detail::warp_reduce(emu::detail::kRedMinSigned, mask,
                                                   static_cast<unsigned>(value),
                                                   "__reduce_min_sync()", loc));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value,
                                  const std::source_location loc = std::source_location::current()) {
  return emu::detail::warp_reduce(emu::detail::kRedMax, mask, value, "__reduce_max_sync()", loc);
}
inline int __reduce_max_sync(unsigned mask, int value,
                             const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(emu::detail::warp_reduce(emu::detail::kRedMaxSigned, mask,
                                                   static_cast<unsigned>(value),
                                                   "__reduce_max_sync()", loc));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned value,
                                  const std::source_location loc = std::source_location::current()) {
  return emu::detail::warp_reduce(emu::detail::kRedAnd, mask, value, "__reduce_and_sync()", loc);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value,
                                 const std::source_location loc = std::source_location::current()) {
  return emu::detail::warp_reduce(emu::detail::kRedOr, mask, value, "__reduce_or_sync()", loc);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned value,
                                  const std::source_location loc = std::source_location::current()) {
  return emu::detail::warp_reduce(emu::detail::kRedXor, mask, value, "__reduce_xor_sync()", loc);
}

// ---------------------------------------------------------------- atomics
// Sequentially consistent (stronger than CUDA's relaxed atomics) so that ThreadSanitizer sees the
// synchronisation a correct kernel builds from atomics plus __threadfence.
template <class T>
inline T atomicAdd(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_add(val);
}
template <class T>
inline T atomicSub(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_sub(val);
}
template <class T>
inline T atomicExch(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).exchange(val);
}
template <class T>
inline T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not the swap happened
}
template <class T>
inline T atomicMax(T* address, std::type_identity_t<T> val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < val && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <class T>
inline T atomicMin(T* address, std::type_identity_t<T> val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (val < old && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <class T>
inline T atomicAnd(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_and(val);
}
template <class T>
inline T atomicOr(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_or(val);
}
template <class T>
inline T atomicXor(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_xor(val);
}
// ((old >= val) ? 0 : old + 1), as CUDA defines it.
inline unsigned atomicInc(unsigned* address, unsigned val) {
  std::atomic_ref<unsigned> ref(*address);
  unsigned old = ref.load();
  while (!ref.compare_exchange_weak(old, old >= val ? 0u : old + 1u)) {
  }
  return old;
}
// (((old == 0) || (old > val)) ? val : old - 1), as CUDA defines it.
inline unsigned atomicDec(unsigned* address, unsigned val) {
  std::atomic_ref<unsigned> ref(*address);
  unsigned old = ref.load();
  while (!ref.compare_exchange_weak(old, (old == 0u || old > val) ? val : old - 1u)) {
  }
  return old;
}
#define EMU_ATOMIC_SCOPED(name)                                                          \
  template <class T, class... A>                                                         \
  inline T name##_block(T* address, A... args) { return name(address, args...); }        \
  template <class T, class... A>                                                         \
  inline T name##_system(T* address, A... args) { return name(address, args...); }
EMU_ATOMIC_SCOPED(atomicAdd)
EMU_ATOMIC_SCOPED(atomicSub)
EMU_ATOMIC_SCOPED(atomicExch)
EMU_ATOMIC_SCOPED(atomicCAS)
EMU_ATOMIC_SCOPED(atomicMax)
EMU_ATOMIC_SCOPED(atomicMin)
EMU_ATOMIC_SCOPED(atomicAnd)
EMU_ATOMIC_SCOPED(atomicOr)
EMU_ATOMIC_SCOPED(atomicXor)
#undef EMU_ATOMIC_SCOPED

// ---------------------------------------------------------------- fences
// A full fence (a compiler barrier under ThreadSanitizer, which does not model fences). Correct
// kernels synchronise through atomics, which are seq_cst here, so TSan still sees their ordering.
// x86 is strongly ordered: a MISSING __threadfence is invisible here and is checked only on a GPU.
namespace emu::detail {
inline void full_fence() {
#if defined(__SANITIZE_THREAD__)
  asm volatile("" ::: "memory");
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}
}  // namespace emu::detail
inline void __threadfence() { emu::detail::full_fence(); }
inline void __threadfence_block() { emu::detail::full_fence(); }
inline void __threadfence_system() { emu::detail::full_fence(); }

// ---------------------------------------------------------------- cache-hinted loads and stores
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *const_cast<const volatile T*>(p); }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- misc device functions
inline void __trap() { emu::detail::fault("__trap() called"); }
inline void __nanosleep(unsigned ns) {
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}

template <class To, class From>
inline To emu_bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
inline unsigned __float_as_uint(float x) { return emu_bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return emu_bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return emu_bit_cast<float>(x); }
inline float __int_as_float(int x) { return emu_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return emu_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return emu_bit_cast<double>(x); }

// Fast-math intrinsics: the emulator computes them exactly (GPU results differ in the last bits).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }

// CUDA's global min/max accept mixed argument types and return the promoted type; for floating
// point they are fminf/fmaxf (a NaN operand yields the other operand).
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) {
    return std::fmin(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
  }
}
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) {
    return std::fmax(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
  }
}
