// CUDA keywords, built-in variables and vector types for g++ (test-only CUDA emulator).
//
// With these, a CUDA source compiles as plain C++: the execution-space qualifiers vanish, every
// __global__ function becomes an ordinary function that the emulator calls once per emulated
// thread, and threadIdx/blockIdx/blockDim/gridDim are thread_local variables that the launcher
// sets before it calls the kernel.
#pragma once

#ifndef FUSEDRNN_EMULATED_CUDA
#define FUSEDRNN_EMULATED_CUDA 1
#endif

#include <cstddef>
#include <cstdint>

#define __host__
#define __device__
#define __global__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __cudart_builtin__
// g++ understands __restrict__ natively. __noinline__ is deliberately not defined: libstdc++ uses
// __attribute__((__noinline__)) itself, so a macro would break the standard headers.

namespace emu::detail {
inline bool static_shared_allowed(const char* file, int line);  // emu_engine.h
}  // namespace emu::detail

// Static __shared__ variables become function statics: one copy per kernel, which is only right
// while one block runs at a time (non-cooperative launches run their blocks one after another).
// Each declaration also checks, when it executes, that the current launch runs blocks one at a
// time, so a cooperative kernel that uses static shared memory fails loudly instead of silently
// sharing one buffer between blocks. `extern __shared__` does not compile here on purpose: use
// FUSEDRNN_DYNAMIC_SMEM (csrc/cuda/launch_compat.h) for dynamic shared memory.
#define EMU_SHARED_CONCAT2(a, b) a##b
#define EMU_SHARED_CONCAT(a, b) EMU_SHARED_CONCAT2(a, b)
#define __shared__                                                                  \
  const bool EMU_SHARED_CONCAT(emu_static_shared_check_, __COUNTER__)               \
      __attribute__((unused)) = ::emu::detail::static_shared_allowed(__FILE__, __LINE__); \
  static

// ---------------------------------------------------------------- vector types (vector_types.h)
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define EMU_VECTOR_TYPES(T, name, align2, align4)                                   \
  struct __attribute__((aligned(sizeof(T)))) name##1 { T x; };                      \
  struct __attribute__((aligned(align2))) name##2 { T x, y; };                      \
  struct name##3 { T x, y, z; };                                                    \
  struct __attribute__((aligned(align4))) name##4 { T x, y, z, w; };                \
  inline name##1 make_##name##1(T x) { return name##1{x}; }                         \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                 \
  inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }         \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }

EMU_VECTOR_TYPES(float, float, 8, 16)
EMU_VECTOR_TYPES(double, double, 16, 16)
EMU_VECTOR_TYPES(int, int, 8, 16)
EMU_VECTOR_TYPES(unsigned short, ushort, 4, 8)
EMU_VECTOR_TYPES(short, short, 4, 8)
EMU_VECTOR_TYPES(long long, longlong, 16, 16)
EMU_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
#undef EMU_VECTOR_TYPES
struct __attribute__((aligned(4))) uint1 { unsigned int x; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------- built-in variables
// Set by the launcher in each emulated thread; zero outside a kernel.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;
