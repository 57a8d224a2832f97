// __half and __nv_bfloat16 on the host, bit-exact with CUDA: conversions round to nearest even
// (NaN becomes the canonical 0x7FFF, as CUDA's conversions produce), and each arithmetic operation
// is computed in float and rounded once, which equals the native half/bf16 result because float
// carries more than twice the significand bits of either format (no double-rounding error).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu_keywords.h"

namespace emu::detail {

inline double round_half_even(double s) {  // s >= 0, exact for |s| < 2^52
  const double r = std::floor(s);
  const double frac = s - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) return r + 1.0;
  return r;
}

// Rounds v (a double; a float converts exactly) to a binary format with `kMantBits` stored
// significand bits and exponent range [kMinExp, kMaxExp] (normal numbers), round to nearest even,
// and returns the format's bits with `kExpBits` exponent bits. NaN -> canonical 0x7FFF.
template <int kMantBits, int kExpBits, int kMinExp, int kMaxExp>
inline uint16_t round_to_small_float(double v) {
  if (std::isnan(v)) return 0x7FFF;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  const uint16_t inf = static_cast<uint16_t>(((1u << kExpBits) - 1u) << kMantBits);
  if (std::isinf(a)) return sign | inf;
  if (a < std::ldexp(1.0, kMinExp)) {
    // subnormal (or zero): integer multiple of 2^(kMinExp - kMantBits); 2^kMantBits rounds up
    // into the smallest normal, which the same bit pattern encodes.
    const double units = round_half_even(std::ldexp(a, kMantBits - kMinExp));
    return sign | static_cast<uint16_t>(units);
  }
  int e2 = 0;
  std::frexp(a, &e2);  // a = m * 2^e2, m in [0.5, 1)
  int exponent = e2 - 1;
  double significand = round_half_even(std::ldexp(a, kMantBits - exponent));  // [2^M, 2^(M+1)]
  if (significand >= std::ldexp(1.0, kMantBits + 1)) {
    significand = std::ldexp(1.0, kMantBits);
    ++exponent;
  }
  if (exponent > kMaxExp) return sign | inf;
  const int bias = (1 << (kExpBits - 1)) - 1;
  const uint32_t mant = static_cast<uint32_t>(significand) - (1u << kMantBits);
  return sign | static_cast<uint16_t>((static_cast<uint32_t>(exponent + bias) << kMantBits) | mant);
}

inline uint16_t double_to_half_bits(double v) { return round_to_small_float<10, 5, -14, 15>(v); }
inline uint16_t double_to_bf16_bits(double v) { return round_to_small_float<7, 8, -126, 127>(v); }

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -magnitude : magnitude;
  }
  uint32_t bits;
  if (exponent == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exponent - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace emu::detail

// ---------------------------------------------------------------- __half
struct __half_raw {
  unsigned short x;
};

struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& raw) : __x(raw.x) {}
  __half(float f) : __x(emu::detail::double_to_half_bits(f)) {}
  __half(double d) : __x(emu::detail::double_to_half_bits(d)) {}
  __half(int i) : __x(emu::detail::double_to_half_bits(i)) {}
  __half(unsigned u) : __x(emu::detail::double_to_half_bits(u)) {}
  __half(long i) : __x(emu::detail::double_to_half_bits(static_cast<double>(i))) {}
  __half(unsigned long u) : __x(emu::detail::double_to_half_bits(static_cast<double>(u))) {}
  __half(long long i) : __x(emu::detail::double_to_half_bits(static_cast<double>(i))) {}
  __half(unsigned long long u) : __x(emu::detail::double_to_half_bits(static_cast<double>(u))) {}
  __half(short i) : __x(emu::detail::double_to_half_bits(i)) {}
  __half(unsigned short u) : __x(emu::detail::double_to_half_bits(u)) {}
  operator float() const { return emu::detail::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
  __half& operator=(float f) { return *this = __half(f); }
  __half& operator=(double d) { return *this = __half(d); }
};

struct __align__(4) __half2 {
  __half x, y;
};
struct __half2_raw {
  unsigned short x, y;
};

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline __half __int2half_rn(int i) { return __half(i); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __short_as_half(short s) { return __half(__half_raw{static_cast<unsigned short>(s)}); }

inline __half2 make_half2(__half x, __half y) { return __half2{x, y}; }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__half(lo), __half(hi)}; }
inline __half2 __float2half2_rn(float f) { return __half2{__half(f), __half(f)}; }
inline __half2 __half2half2(__half h) { return __half2{h, h}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x), float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }

// ---------------------------------------------------------------- __nv_bfloat16
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& raw) : __x(raw.x) {}
  __nv_bfloat16(float f) : __x(emu::detail::double_to_bf16_bits(f)) {}
  __nv_bfloat16(double d) : __x(emu::detail::double_to_bf16_bits(d)) {}
  __nv_bfloat16(int i) : __x(emu::detail::double_to_bf16_bits(i)) {}
  __nv_bfloat16(unsigned u) : __x(emu::detail::double_to_bf16_bits(u)) {}
  __nv_bfloat16(long i) : __x(emu::detail::double_to_bf16_bits(static_cast<double>(i))) {}
  __nv_bfloat16(unsigned long u) : __x(emu::detail::double_to_bf16_bits(static_cast<double>(u))) {}
  __nv_bfloat16(long long i) : __x(emu::detail::double_to_bf16_bits(static_cast<double>(i))) {}
  __nv_bfloat16(unsigned long long u)
      : __x(emu::detail::double_to_bf16_bits(static_cast<double>(u))) {}
  __nv_bfloat16(short i) : __x(emu::detail::double_to_bf16_bits(i)) {}
  __nv_bfloat16(unsigned short u) : __x(emu::detail::double_to_bf16_bits(u)) {}
  operator float() const { return emu::detail::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
  __nv_bfloat16& operator=(float f) { return *this = __nv_bfloat16(f); }
  __nv_bfloat16& operator=(double d) { return *this = __nv_bfloat16(d); }
};
using nv_bfloat16 = __nv_bfloat16;

struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using nv_bfloat162 = __nv_bfloat162;

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(i); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  return __nv_bfloat16(__nv_bfloat16_raw{u});
}
inline __nv_bfloat16 __short_as_bfloat16(short s) {
  return __nv_bfloat16(__nv_bfloat16_raw{static_cast<unsigned short>(s)});
}

inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) {
  return __nv_bfloat162{x, y};
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return __nv_bfloat162{lo, hi};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) {
  return __nv_bfloat162{__nv_bfloat16(f), __nv_bfloat16(f)};
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 b) { return __nv_bfloat162{b, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{float(b.x), float(b.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float __low2float(__nv_bfloat162 b) { return float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return float(b.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 b) { return b.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 b) { return b.y; }

// ---------------------------------------------------------------- arithmetic (both types)
#define EMU_SMALL_FLOAT_OPS(T)                                                                 \
  inline T operator+(T a, T b) { return T(float(a) + float(b)); }                            \
  inline T operator-(T a, T b) { return T(float(a) - float(b)); }                            \
  inline T operator*(T a, T b) { return T(float(a) * float(b)); }                            \
  inline T operator/(T a, T b) { return T(float(a) / float(b)); }                            \
  inline T operator-(T a) {                                                                  \
    T r = a;                                                                                 \
    r.__x ^= 0x8000u;                                                                        \
    return r;                                                                                \
  }                                                                                          \
  inline T operator+(T a) { return a; }                                                      \
  inline T& operator+=(T& a, T b) { return a = a + b; }                                      \
  inline T& operator-=(T& a, T b) { return a = a - b; }                                      \
  inline T& operator*=(T& a, T b) { return a = a * b; }                                      \
  inline T& operator/=(T& a, T b) { return a = a / b; }                                      \
  inline bool operator==(T a, T b) { return float(a) == float(b); }                          \
  inline bool operator!=(T a, T b) { return float(a) != float(b); }                          \
  inline bool operator<(T a, T b) { return float(a) < float(b); }                            \
  inline bool operator<=(T a, T b) { return float(a) <= float(b); }                          \
  inline bool operator>(T a, T b) { return float(a) > float(b); }                            \
  inline bool operator>=(T a, T b) { return float(a) >= float(b); }                          \
  inline T __hadd(T a, T b) { return a + b; }                                                \
  inline T __hsub(T a, T b) { return a - b; }                                                \
  inline T __hmul(T a, T b) { return a * b; }                                                \
  inline T __hdiv(T a, T b) { return a / b; }                                                \
  inline T __hneg(T a) { return -a; }                                                        \
  inline T __habs(T a) {                                                                     \
    T r = a;                                                                                 \
    r.__x &= 0x7FFFu;                                                                        \
    return r;                                                                                \
  }                                                                                          \
  inline T __hfma(T a, T b, T c) {                                                           \
    return T(std::fma(double(float(a)), double(float(b)), double(float(c))));                \
  }                                                                                          \
  inline T __hmax(T a, T b) { return T(std::fmax(float(a), float(b))); }                    \
  inline T __hmin(T a, T b) { return T(std::fmin(float(a), float(b))); }                    \
  inline bool __heq(T a, T b) { return a == b; }                                             \
  inline bool __hne(T a, T b) { return a != b; }                                             \
  inline bool __hlt(T a, T b) { return a < b; }                                              \
  inline bool __hle(T a, T b) { return a <= b; }                                             \
  inline bool __hgt(T a, T b) { return a > b; }                                              \
  inline bool __hge(T a, T b) { return a >= b; }                                             \
  inline bool __hisnan(T a) { return std::isnan(float(a)); }                                 \
  inline int __hisinf(T a) {                                                                 \
    const float f = float(a);                                                                \
    return std::isinf(f) ? (f > 0 ? 1 : -1) : 0;                                             \
  }

EMU_SMALL_FLOAT_OPS(__half)
EMU_SMALL_FLOAT_OPS(__nv_bfloat16)
#undef EMU_SMALL_FLOAT_OPS

#define EMU_SMALL_FLOAT2_OPS(T2)                                                               \
  inline T2 __hadd2(T2 a, T2 b) { return T2{a.x + b.x, a.y + b.y}; }                         \
  inline T2 __hsub2(T2 a, T2 b) { return T2{a.x - b.x, a.y - b.y}; }                         \
  inline T2 __hmul2(T2 a, T2 b) { return T2{a.x * b.x, a.y * b.y}; }                         \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline T2 operator+(T2 a, T2 b) { return __hadd2(a, b); }                                  \
  inline T2 operator-(T2 a, T2 b) { return __hsub2(a, b); }                                  \
  inline T2 operator*(T2 a, T2 b) { return __hmul2(a, b); }

EMU_SMALL_FLOAT2_OPS(__half2)
EMU_SMALL_FLOAT2_OPS(__nv_bfloat162)
#undef EMU_SMALL_FLOAT2_OPS
