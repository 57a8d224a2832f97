// A tiny SIMD vector type for the CPU recurrence, built on GCC/Clang vector extensions so that one
// source compiles to SSE2, AVX2+FMA or AVX-512 depending on the flags of the translation unit that
// includes it (see recurrence_isa_*.cpp). Everything lives in the per-ISA namespace
// fusedrnn::cpu::FUSEDRNN_CPU_ISA, so the copies compiled with different flags never merge at link
// time (an AVX-512 copy picked for an AVX2 machine would crash).
//
// The cell formulas of fusedrnn/cell_math.h are templates on the accumulation type; instantiated
// with Vec they run W lanes at once. They call act_sigmoid / act_tanh / act_relu unqualified, so
// the overloads below are found by argument-dependent lookup.
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "simd_vec.h is included by the per-ISA translation units only"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// The activations run inside the fused cell update of every unit: inlining them keeps the
// gate vectors in registers (a call spills all of them).
#define FUSEDRNN_VEC_INLINE inline __attribute__((always_inline))

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

template <typename T, int W>
struct Vec {
  static_assert(W > 1, "Vec<T, 1> has its own specialisation");
  typedef T Raw __attribute__((vector_size(sizeof(T) * W)));
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Int IRaw __attribute__((vector_size(sizeof(T) * W)));
  static constexpr int kWidth = W;

  Raw v;

  Vec() = default;
  // s - 0 rather than 0 + s: the compiler may drop "- 0" (exact even for -0.0), so a broadcast
  // of a loaded scalar folds into the FMA's memory operand ({1toN}) instead of costing an add
  // and a shuffle on the FMA port.
  explicit Vec(T s) : v(s - Raw{}) {}
  static Vec of(Raw r) {
    Vec x;
    x.v = r;
    return x;
  }
  static Vec zero() { return of(Raw{}); }
  static Vec load(const T* p) {
    Vec x;
    std::memcpy(&x.v, p, sizeof(Raw));
    return x;
  }
  // Loads n (0..W) elements, the rest zero: the tail of a hidden size that is not a multiple of W.
  static Vec load_partial(const T* p, int n) {
    if (n >= W) return load(p);
    Vec x = zero();
    std::memcpy(&x.v, p, sizeof(T) * n);
    return x;
  }
  void store(T* p) const { std::memcpy(p, &v, sizeof(Raw)); }
  void store_partial(T* p, int n) const {
    if (n >= W) {
      store(p);
    } else {
      std::memcpy(p, &v, sizeof(T) * n);
    }
  }

  friend Vec operator+(Vec a, Vec b) { return of(a.v + b.v); }
  friend Vec operator-(Vec a, Vec b) { return of(a.v - b.v); }
  friend Vec operator*(Vec a, Vec b) { return of(a.v * b.v); }
  friend Vec operator/(Vec a, Vec b) { return of(a.v / b.v); }
  friend Vec operator-(Vec a) { return of(-a.v); }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
};

// In-register transpose of W vectors (rows) of W lanes, by swapping the off-diagonal s x s
// blocks of every 2s x 2s block for s = W/2 .. 1 (one two-source shuffle per row and stage).
template <typename T, int W, int S, bool kHigh, size_t... J>
FUSEDRNN_VEC_INLINE typename Vec<T, W>::Raw swap_blocks(typename Vec<T, W>::Raw a,
                                                        typename Vec<T, W>::Raw b,
                                                        std::index_sequence<J...>) {
  using I = typename Vec<T, W>::IRaw;
  using E = typename Vec<T, W>::Int;
  // Row i (bit S clear) keeps its columns without bit S and takes row i+S's columns j-S;
  // row i+S takes row i's columns j+S and keeps its own columns with bit S.
  constexpr I mask = kHigh ? I{static_cast<E>((J & S) ? W + J : J + S)...}
                           : I{static_cast<E>((J & S) ? W + J - S : J)...};
  return __builtin_shuffle(a, b, mask);
}

template <typename T, int W, int S = W / 2>
FUSEDRNN_VEC_INLINE void transpose(Vec<T, W> (&rows)[W]) {
  if constexpr (S >= 1) {
    for (int i = 0; i < W; ++i) {
      if (i & S) continue;
      const auto a = rows[i].v, b = rows[i + S].v;
      rows[i].v = swap_blocks<T, W, S, false>(a, b, std::make_index_sequence<W>{});
      rows[i + S].v = swap_blocks<T, W, S, true>(a, b, std::make_index_sequence<W>{});
    }
    transpose<T, W, S / 2>(rows);
  }
}

// One lane: used where cell_math.h branches on a value (rnn_backward for relu).
template <typename T>
struct Vec<T, 1> {
  T v;
  Vec() = default;
  explicit Vec(T s) : v(s) {}
  friend Vec operator+(Vec a, Vec b) { return Vec(a.v + b.v); }
  friend Vec operator-(Vec a, Vec b) { return Vec(a.v - b.v); }
  friend Vec operator*(Vec a, Vec b) { return Vec(a.v * b.v); }
  friend Vec operator/(Vec a, Vec b) { return Vec(a.v / b.v); }
  friend Vec operator-(Vec a) { return Vec(-a.v); }
  friend bool operator<=(Vec a, Vec b) { return a.v <= b.v; }
};

// ---------------------------------------------------------- float: polynomial exp, rational tanh
// Cephes-style: exp(x) = 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial for e^r (about
// 1 ulp). NaN propagates (comparisons are written so NaN keeps its lane).
template <int W>
FUSEDRNN_VEC_INLINE Vec<float, W> exp_poly(Vec<float, W> x) {
  using V = Vec<float, W>;
  using R = typename V::Raw;
  using I = typename V::IRaw;
  const R hi = R{} + 88.0f;   // exp(88) < FLT_MAX, and n stays <= 127
  const R lo = R{} - 87.3f;   // n >= -126: 2^n stays a normal number
  R a = x.v;
  a = a > hi ? hi : a;
  a = a < lo ? lo : a;
  const R magic = R{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const R n = (a * 1.44269504088896341f + magic) - magic;
  R r = a - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  R p = R{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const R y = (p * (r * r) + r) + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return V::of(y * reinterpret_cast<R>(bits));
}

// One Newton step for 1/x from the estimate est, in residual form: e = 1 - x est is exact with
// an FMA (-ffp-contract=fast makes both lines one FMA each), and est + est e then rounds like
// the division, within an ulp. The form est (2 - x est) rounds 2 - x est first: from AVX2's
// estimate it converged to 0.49999997 for 1/2, so sigmoid(0) was not 0.5 and a gate biased
// by that leaked over long sequences (LSTM, constant forget gate, T=20000: 3.5-4x torch.nn's
// error; review, session 30).
template <typename R>
FUSEDRNN_VEC_INLINE R newton_recip_step(R x, R est) {
  const R e = 1.0f - x * est;
  return est + est * e;
}

// 1/x: the hardware estimate refined by Newton steps (within an ulp, like the division it
// replaces), because a division costs a multi-cycle unpipelined slot per vector and a cell runs
// several per unit.
template <int W>
FUSEDRNN_VEC_INLINE Vec<float, W> recip(Vec<float, W> x) {
  using V = Vec<float, W>;
  [[maybe_unused]] typedef typename V::Raw R;
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    // The all-lanes mask form: _mm512_rcp14_ps passes GCC 12 an "undefined" source vector that
    // it then reports as used uninitialized (a false positive, the same instruction).
    const R est = reinterpret_cast<R>(
        _mm512_maskz_rcp14_ps(static_cast<__mmask16>(0xFFFF), reinterpret_cast<__m512>(x.v)));
    return V::of(newton_recip_step(x.v, est));  // 14 bits -> 24
  }
#endif
#if defined(__AVX__)
  if constexpr (W == 8) {
    const R est = reinterpret_cast<R>(_mm256_rcp_ps(reinterpret_cast<__m256>(x.v)));
    return V::of(newton_recip_step(x.v, newton_recip_step(x.v, est)));  // 12 bits -> 24
  }
#endif
  return V(1.0f) / x;
}

// 1 / (1 + e^-x), saturated as torch.sigmoid's same formula saturates: exactly 1 where
// 1 + e^-x rounds to 1 (e^-x < 2^-24: x > 24 ln 2), exactly 0 where e^-x overflows
// (x < -ln FLT_MAX). The constants are the first floats past those bounds, so they compare
// inclusively. Left to the approximations, a saturated gate was 1 - 2^-24 (AVX2's refined
// reciprocal) or 6e-39 (exp_poly clamps at 88), and its derivative s(1-s) was not 0 as torch's
// is: a forget gate stuck at 1 - 2^-24 leaked over a long sequence (LSTM with forget bias 20,
// T=20000, AVX2: c_n 9e-4 off against torch's 1e-5), and 6e-39 times operands of 1e30 made
// weight gradients of 1e21 where torch's are ~1, and inf where torch's are NaN (fuzzing).
template <int W>
FUSEDRNN_VEC_INLINE Vec<float, W> act_sigmoid(Vec<float, W> x) {
  using V = Vec<float, W>;
  using R = typename V::Raw;
  R y = recip(V(1.0f) + exp_poly(-x)).v;
  y = x.v >= 16.6355324f ? R{} + 1.0f : y;  // NaN keeps its lane
  y = x.v <= -88.7228394f ? R{} : y;
  return V::of(y);
}

// tanh(x) = x P(x^2) / Q(x^2) on |x| < 9, a rational fit of degree 13/6 (relative error 5e-8
// with its coefficients rounded to float), and +-1 from |x| = 9 on, as libm and torch give: a
// saturated state is exactly 1, not 1 - 2^-24 (tanh rounds to 1 in float from 9.01; between 9
// and 9.01 this is 1 ulp high). In float32 it is within 6.5 ulp of the true value over
// the float range (measured: 5.3 ulp with AVX-512 and AVX2, 6.3 generic;
// tests/test_activations.py), x itself for tiny x, and never past +-1. Near saturation that is
// ~9x the absolute error of torch's tanh (0.5 ulp) in 1 - h^2, the derivative the backward
// forms from h: gradients through units at |x| of 6-8 were 4-6x torch.nn's float32 error
// against float64 in a review (session 30), where torch.nn's own were 1e-3 to 6e-2 off.
// It replaced an exp-based formula (1.6 ulp) that computed two branches, |x| < 0.625 by an odd
// polynomial and 1 - 2 / (e^2|x| + 1) beyond: 19 vector operations instead of about 36, and an
// LSTM cell runs two tanh per unit. LSTM B=64 H=256 T=100 inference, native forward on the
// 2-core SPR VM (3 A/B pairs): 16.4-17.6 -> 15.0-15.5 ms on two threads, 26.8-28.1 -> 25.5-26.0 on one.
template <int W>
FUSEDRNN_VEC_INLINE Vec<float, W> act_tanh(Vec<float, W> x) {
  using V = Vec<float, W>;
  using R = typename V::Raw;
  R a = x.v;
  a = a > 9.0f ? R{} + 9.0f : a;  // NaN keeps its lane
  a = a < -9.0f ? R{} - 9.0f : a;
  const R z = a * a;
  R p = R{} - 8.488272e-14f;
  p = p * z + 5.277841e-11f;
  p = p * z - 2.0225155e-08f;
  p = p * z + 1.1154327e-05f;
  p = p * z + 3.1039603e-03f;
  p = p * z + 1.3084015e-01f;
  p = p * z + 1.0f;
  R q = R{} + 2.5461498e-04f;
  q = q * z + 2.4495197e-02f;
  q = q * z + 4.641734e-01f;
  q = q * z + 1.0f;
  // Near |x| = 9 the rounding of P and Q can carry the quotient past 1 (by up to 2 ulp).
  R y = (a * p) * recip(V::of(q)).v;
  y = y > 1.0f || a >= 9.0f ? R{} + 1.0f : y;  // NaN keeps its lane
  y = y < -1.0f || a <= -9.0f ? R{} - 1.0f : y;
  return V::of(y);
}

template <int W>
FUSEDRNN_VEC_INLINE Vec<float, W> act_relu(Vec<float, W> x) {
  using V = Vec<float, W>;
  const typename V::Raw zero{};
  return V::of(x.v < zero ? zero : x.v);  // NaN and -0 kept, as cell_math.h's act_relu
}

// ------------------------------------------------------------------ double: libm per lane
// float64 is the accuracy path (1e-10 relative against torch): keep libm's exp/tanh exactly.
template <int W>
FUSEDRNN_VEC_INLINE Vec<double, W> act_sigmoid(Vec<double, W> x) {
  Vec<double, W> y;
  for (int i = 0; i < W; ++i) y.v[i] = 1.0 / (1.0 + std::exp(-x.v[i]));
  return y;
}

template <int W>
FUSEDRNN_VEC_INLINE Vec<double, W> act_tanh(Vec<double, W> x) {
  Vec<double, W> y;
  for (int i = 0; i < W; ++i) y.v[i] = std::tanh(x.v[i]);
  return y;
}

template <int W>
FUSEDRNN_VEC_INLINE Vec<double, W> act_relu(Vec<double, W> x) {
  using V = Vec<double, W>;
  const typename V::Raw zero{};
  return V::of(x.v < zero ? zero : x.v);  // NaN and -0 kept, as cell_math.h's act_relu
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
