// What the CPU kernels' tensors hold (the storage type S) as opposed to what they compute in (T):
// the recurrence's and the cell step's (cell_step_impl.h). float and double are both at once.
// bfloat16 is storage only: every load widens it to float (exact: a bfloat16 is the top half of
// a float) and every store rounds a float to the nearest bfloat16 (ties to even, NaN stays NaN),
// so a bfloat16 layer runs the float kernel with bfloat16 tensors at its edges. The kernel's own
// buffers (packed weights, h, c) stay in T: the cell state and the sums never round to bfloat16
// between steps. (The AMX build is the exception for the per-step product only: it multiplies
// bfloat16 copies of h and d_pre on tiles, amx_tiles.h.)
//
// Call sites read and write every sequence, state and weight through load_as / store_as, which
// are plain vector loads and stores when S is T. One exception: InPlaceDots::dots reads bfloat16
// W_hh rows as pairs of weights per 32-bit lane, which widens them in fewer operations.
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "storage.h is included by the per-ISA translation units only"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd_vec.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// The bits of one bfloat16 value.
struct BFloat16 {
  uint16_t bits;
};

// W-lane vectors of the bits (typedefs of a class template: GCC 12 rejects
// __builtin_convertvector on a vector typedef local to a function template).
template <int W>
struct BitLanes {
  typedef uint16_t U16 __attribute__((vector_size(2 * W)));
  typedef uint32_t U32 __attribute__((vector_size(4 * W)));
};

inline float widen_bf16(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &word, sizeof x);
  return x;
}

inline uint16_t round_to_bf16(float x) {
  uint32_t word;
  std::memcpy(&word, &x, sizeof word);
  if (x != x) return static_cast<uint16_t>((word >> 16) | 0x40u);  // a quiet NaN, sign kept
  return static_cast<uint16_t>((word + 0x7FFFu + ((word >> 16) & 1u)) >> 16);
}

// One element, storage to compute type and back.
template <typename T, typename S>
inline T to_compute(S s) {
  if constexpr (std::is_same_v<S, BFloat16>) {
    return widen_bf16(s.bits);
  } else {
    return s;
  }
}
template <typename S, typename T>
inline S to_storage(T x) {
  if constexpr (std::is_same_v<S, BFloat16>) {
    return BFloat16{round_to_bf16(x)};
  } else {
    return x;
  }
}

// Loads p[0..n) (n in 0..W, default W) into a vector of the compute type, the other lanes zero;
// touches no element past p[n-1].
template <typename V, typename S>
FUSEDRNN_VEC_INLINE V load_as(const S* p, int n = V::kWidth) {
  if constexpr (std::is_same_v<S, BFloat16>) {
    constexpr int W = V::kWidth;
    static_assert(sizeof(typename V::Raw) == 4 * W, "bfloat16 widens to float only");
    using U16 = typename BitLanes<W>::U16;
    using U32 = typename BitLanes<W>::U32;
    U16 half{};
    // A full vector as one load: with n only known at run time, the one variable-length
    // memcpy was a call to libc's memcpy per vector (a bfloat16 cell step's update took 3x
    // the float one's).
    if (n >= W) {
      std::memcpy(&half, p, sizeof half);
    } else {
      std::memcpy(&half, p, sizeof(uint16_t) * n);
    }
    const U32 word = __builtin_convertvector(half, U32) << 16;
    V x;
    std::memcpy(&x.v, &word, sizeof word);
    return x;
  } else {
    return V::load_partial(p, n);
  }
}

// Stores lanes [0, n) of v (n in 0..W, default W) at p.
template <typename S, typename V>
FUSEDRNN_VEC_INLINE void store_as(S* p, const V& v, int n = V::kWidth) {
  if constexpr (std::is_same_v<S, BFloat16>) {
    constexpr int W = V::kWidth;
    using U16 = typename BitLanes<W>::U16;
    using U32 = typename BitLanes<W>::U32;
    U32 word;
    std::memcpy(&word, &v.v, sizeof word);
    const U32 rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
    const U32 nan = reinterpret_cast<U32>(v.v != v.v);  // all ones in NaN lanes
    const U32 bits = (rounded & ~nan) | (((word >> 16) | 0x40u) & nan);
    const U16 half = __builtin_convertvector(bits, U16);
    if (n >= W) {  // (as in load_as)
      std::memcpy(p, &half, sizeof half);
    } else {
      std::memcpy(p, &half, sizeof(uint16_t) * n);
    }
  } else {
    v.store_partial(p, n);
  }
}

// n elements from src (storage or compute type) to dest (the other), converted one by one.
template <typename To, typename From>
inline void convert_row(To* dest, const From* src, int64_t n) {
  if constexpr (std::is_same_v<To, From>) {
    std::memcpy(dest, src, sizeof(To) * n);
  } else if constexpr (std::is_same_v<From, BFloat16>) {
    for (int64_t i = 0; i < n; ++i) dest[i] = to_compute<To>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dest[i] = to_storage<To>(src[i]);
  }
}

// Zeroes n elements of storage.
template <typename S>
inline void zero_row(S* dest, int64_t n) {
  std::memset(static_cast<void*>(dest), 0, sizeof(S) * n);
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
