// __half / __nv_bfloat16 conversions and arithmetic, bit-exact against independent oracles:
// g++'s _Float16 (IEEE binary16, round to nearest even) for half, and the classic integer
// rounding formula for bfloat16.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "selftest.h"

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t oracle_half(float f) {
  if (std::isnan(f)) return 0x7FFF;
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
uint16_t oracle_half_from_double(double d) {
  if (std::isnan(d)) return 0x7FFF;
  const _Float16 h = static_cast<_Float16>(d);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
uint16_t oracle_bf16(float f) {
  if (std::isnan(f)) return 0x7FFF;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Floats that stress rounding: random bit patterns plus, for every exponent, values at and next to
// the halfway points of both formats.
std::vector<float> interesting_floats() {
  std::vector<float> values;
  std::mt19937 rng(1234);
  for (int i = 0; i < 200000; ++i) values.push_back(bits_float(rng()));
  for (uint32_t exponent = 0; exponent < 256; ++exponent) {
    for (uint32_t low : {0x0u, 0x1u, 0xFFFu, 0x1000u, 0x1001u, 0x2000u, 0x3000u, 0x7FFFu, 0x8000u,
                         0x8001u, 0x10000u, 0x18000u, 0x7FFFFFu, 0x7FE000u, 0x7FF000u}) {
      for (uint32_t sign : {0u, 0x80000000u}) values.push_back(bits_float(sign | exponent << 23 | low));
    }
  }
  for (float f : {65504.0f, 65519.99f, 65520.0f, 65536.0f, 5.96e-8f, 2.98e-8f, 2.99e-8f, 6.1e-5f,
                  3.3895314e38f, 3.4e38f, INFINITY, -INFINITY, NAN, 0.0f, -0.0f}) {
    values.push_back(f);
  }
  return values;
}

TEST_CASE(half_float_to_half_matches_float16) {
  int mismatches = 0;
  for (float f : interesting_floats()) {
    if (__half_as_ushort(__float2half(f)) != oracle_half(f) && ++mismatches < 5) {
      std::fprintf(stderr, "  half(%a): got 0x%04x expected 0x%04x\n", f,
                   __half_as_ushort(__float2half(f)), oracle_half(f));
    }
  }
  CHECK_EQ(mismatches, 0);
}

TEST_CASE(half_double_to_half_rounds_once) {
  std::mt19937_64 rng(99);
  int mismatches = 0;
  for (int i = 0; i < 200000; ++i) {
    // doubles near half's range, with bits below float precision that a double->float->half
    // path would round twice
    const double d = std::ldexp(1.0 + static_cast<double>(rng() >> 11) * 0x1p-53,
                                static_cast<int>(rng() % 50) - 30) * ((rng() & 1) ? -1 : 1);
    if (__half_as_ushort(__double2half(d)) != oracle_half_from_double(d)) ++mismatches;
  }
  CHECK_EQ(mismatches, 0);
}

TEST_CASE(half_every_pattern_round_trips) {
  int mismatches = 0;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const __half h = __ushort_as_half(static_cast<uint16_t>(bits));
    const float f = __half2float(h);
    _Float16 ref;
    const uint16_t b16 = static_cast<uint16_t>(bits);
    std::memcpy(&ref, &b16, 2);
    const float expected = static_cast<float>(ref);
    const bool same = (std::isnan(f) && std::isnan(expected)) || float_bits(f) == float_bits(expected);
    if (!same) ++mismatches;
    if (!std::isnan(f) && __half_as_ushort(__float2half(f)) != bits) ++mismatches;
  }
  CHECK_EQ(mismatches, 0);
}

TEST_CASE(half_arithmetic_matches_float16) {
  std::mt19937 rng(7);
  int mismatches = 0;
  for (int i = 0; i < 100000; ++i) {
    const uint16_t ua = static_cast<uint16_t>(rng()), ub = static_cast<uint16_t>(rng());
    const __half a = __ushort_as_half(ua), b = __ushort_as_half(ub);
    _Float16 fa, fb;
    std::memcpy(&fa, &ua, 2);
    std::memcpy(&fb, &ub, 2);
    const _Float16 refs[4] = {static_cast<_Float16>(fa + fb), static_cast<_Float16>(fa - fb),
                              static_cast<_Float16>(fa * fb), static_cast<_Float16>(fa / fb)};
    const __half got[4] = {a + b, a - b, a * b, a / b};
    for (int k = 0; k < 4; ++k) {
      uint16_t expected;
      std::memcpy(&expected, &refs[k], 2);
      const uint16_t actual = __half_as_ushort(got[k]);
      const bool both_nan = std::isnan(float(got[k])) && std::isnan(static_cast<float>(refs[k]));
      if (!both_nan && actual != expected) ++mismatches;
    }
  }
  CHECK_EQ(mismatches, 0);
}

TEST_CASE(bf16_float_to_bf16_matches_rounding_formula) {
  int mismatches = 0;
  for (float f : interesting_floats()) {
    if (__bfloat16_as_ushort(__float2bfloat16(f)) != oracle_bf16(f) && ++mismatches < 5) {
      std::fprintf(stderr, "  bf16(%a): got 0x%04x expected 0x%04x\n", f,
                   __bfloat16_as_ushort(__float2bfloat16(f)), oracle_bf16(f));
    }
  }
  CHECK_EQ(mismatches, 0);
}

TEST_CASE(bf16_round_trip_and_arithmetic) {
  int mismatches = 0;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float f = __bfloat162float(__ushort_as_bfloat16(static_cast<uint16_t>(bits)));
    if (float_bits(f) != bits << 16) ++mismatches;
    if (!std::isnan(f) && __bfloat16_as_ushort(__float2bfloat16(f)) != bits) ++mismatches;
  }
  std::mt19937 rng(11);
  for (int i = 0; i < 100000; ++i) {
    const __nv_bfloat16 a = __ushort_as_bfloat16(static_cast<uint16_t>(rng()));
    const __nv_bfloat16 b = __ushort_as_bfloat16(static_cast<uint16_t>(rng()));
    // float carries > 2x bf16's significand: one float op then one rounding is the exact result
    const uint16_t expected = oracle_bf16(float(a) * float(b));
    const __nv_bfloat16 product = a * b;
    if (!std::isnan(float(product)) && __bfloat16_as_ushort(product) != expected) ++mismatches;
  }
  CHECK_EQ(mismatches, 0);
  const __nv_bfloat162 pair = __floats2bfloat162_rn(1.0f, -2.5f);
  CHECK(__low2float(pair) == 1.0f && __high2float(pair) == -2.5f);
  const __half2 hp = __floats2half2_rn(0.1f, 3.0f);
  CHECK(__half_as_ushort(hp.x) == oracle_half(0.1f) && __high2float(hp) == 3.0f);
}

}  // namespace
