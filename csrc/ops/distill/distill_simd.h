// Small SIMD toolkit for the CPU distillation kernel, on GCC/Clang vector extensions (portable, no
// intrinsics): packs of float (8 lanes) and double (4 lanes), a vectorised exp and log, and sweeps that
// run a generic per-element body on full packs and then on the scalar tail.
//
// std::exp/std::log calls keep the compiler from vectorising a loop, and a softmax row is exp-bound,
// so float uses Cephes' single-precision polynomials (within 2 ulp on the ranges a softmax sees);
// double (used for gradcheck) keeps std::exp/std::log lane by lane.
#pragma once
#ifndef CPU_CAPABILITY
#error "kernel header: include it only from a *_kernels_cpu.cpp, which is compiled once per CPU level"
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace pyfastpeft::simd {
inline namespace CPU_CAPABILITY {  // one copy per CPU level (pyfastpeft/cpu_dispatch.h)

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

template <typename A>
struct PackOf;
template <>
struct PackOf<float> {
  using type = f32x8;
  static constexpr int64_t lanes = 8;
};
template <>
struct PackOf<double> {
  using type = f64x4;
  static constexpr int64_t lanes = 4;
};

// Tags telling a generic body whether it works on a pack or on one scalar.
template <typename A>
struct PackTag {
  using type = typename PackOf<A>::type;
  static constexpr int64_t width = PackOf<A>::lanes;
};
template <typename A>
struct ScalarTag {
  using type = A;
  static constexpr int64_t width = 1;
};

template <typename A>
inline typename PackOf<A>::type load(PackTag<A>, const A* p) {
  typename PackOf<A>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
inline A load(ScalarTag<A>, const A* p) {
  return *p;
}
template <typename A>
inline void store(PackTag<A>, A* p, typename PackOf<A>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename A>
inline void store(ScalarTag<A>, A* p, A v) {
  *p = v;
}
// Converting store into the tensor's element type (bfloat16/float16 round to nearest even).
template <typename T, typename A>
inline void store_as(PackTag<A>, T* p, typename PackOf<A>::type v) {
  for (int64_t l = 0; l < PackOf<A>::lanes; ++l) p[l] = static_cast<T>(v[l]);
}
template <typename T, typename A>
inline void store_as(ScalarTag<A>, T* p, A v) {
  *p = static_cast<T>(v);
}

inline f32x8 exp(f32x8 x) {
  // exp(x) = 2^n · e^r with n = round(x·log2 e), |r| <= ln2/2; below -87 the result is 0 (underflow).
  const f32x8 xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float round_magic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const f32x8 n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  const f32x8 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  f32x8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? f32x8{} : p * scale;
}

inline f32x8 log(f32x8 x) {
  // x = m·2^e with m in [sqrt(1/2), sqrt(2)); log x = log(1 + (m − 1)) + e·ln2. Only positive x are
  // expected (a mean of two probabilities); 0 comes out near log(FLT_MIN) and only ever multiplies a 0.
  i32x8 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  f32x8 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, f32x8);
  const i32x8 mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  f32x8 m;
  std::memcpy(&m, &mbits, sizeof(m));
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const f32x8 z = m * m;
  f32x8 y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + e * 0.693359375f;
}

inline float exp(float x) { return exp(f32x8{x})[0]; }
inline float log(float x) { return log(f32x8{x})[0]; }

inline f64x4 exp(f64x4 x) {
  for (int l = 0; l < 4; ++l) x[l] = std::exp(x[l]);
  return x;
}
inline f64x4 log(f64x4 x) {
  for (int l = 0; l < 4; ++l) x[l] = std::log(x[l]);
  return x;
}
inline double exp(double x) { return std::exp(x); }
inline double log(double x) { return std::log(x); }

// v where p > 0, else 0: the 0·log 0 = 0 convention, so a probability that is exactly 0 (a -inf logit,
// a masked vocabulary entry) contributes 0 instead of 0·(±inf) = NaN. Works on packs and scalars.
template <typename V>
inline V where_positive(V p, V v) {
  return p > V{} ? v : V{};
}

template <typename V>
inline auto horizontal_sum(V v) {
  auto total = v[0];
  for (int64_t l = 1; l < static_cast<int64_t>(sizeof(V) / sizeof(v[0])); ++l) total += v[l];
  return total;
}

// Σ_{j < n} body(j, tag): body returns a pack for PackTag and a scalar for ScalarTag.
template <typename A, class Body>
inline A sweep_sum(int64_t n, Body&& body) {
  using V = typename PackOf<A>::type;
  constexpr int64_t W = PackOf<A>::lanes;
  V acc0 = {}, acc1 = {};  // two chains, so consecutive packs do not wait on each other
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    acc0 += body(j, PackTag<A>{});
    acc1 += body(j + W, PackTag<A>{});
  }
  for (; j + W <= n; j += W) acc0 += body(j, PackTag<A>{});
  A total = horizontal_sum(acc0 + acc1);
  for (; j < n; ++j) total += body(j, ScalarTag<A>{});
  return total;
}

// body(j, tag) for every j < n, packs first.
template <typename A, class Body>
inline void sweep(int64_t n, Body&& body) {
  constexpr int64_t W = PackOf<A>::lanes;
  int64_t j = 0;
  for (; j + W <= n; j += W) body(j, PackTag<A>{});
  for (; j < n; ++j) body(j, ScalarTag<A>{});
}

template <typename A>
inline A max_of(const A* x, int64_t n) {
  using V = typename PackOf<A>::type;
  constexpr int64_t W = PackOf<A>::lanes;
  V acc = V{} - std::numeric_limits<A>::infinity();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V v = load(PackTag<A>{}, x + j);
    acc = v > acc ? v : acc;
  }
  A m = acc[0];
  for (int64_t l = 1; l < W; ++l) m = acc[l] > m ? acc[l] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastpeft::simd
