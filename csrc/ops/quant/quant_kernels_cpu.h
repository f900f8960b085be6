// CPU kernels of the quant family (formulas in quant.h). Included by quant_kernels_cpu.cpp only.
//
// Two schedules:
//  - contiguous groups (pre == 1, enough groups to feed every thread): one task per group reads the
//    group once for its min/max, then quantizes it again from cache — one read and one write of x;
//  - otherwise (per tensor, per channel on an inner axis) a first pass reduces min/max into per-thread
//    [threads, C] partials (never full-size) and a second elementwise pass quantizes.
// Inner loops run over a stretch where the group is constant (post > 1) or advances by one per element
// (post == 1), so both vectorize.
#pragma once
#ifndef CPU_CAPABILITY
#error "kernel header: include it only from a *_kernels_cpu.cpp, which is compiled once per CPU level"
#endif
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "pyfastpeft/dispatch.h"
#include "quant.h"

namespace pyfastpeft::quant_cpu {
inline namespace CPU_CAPABILITY {  // one copy per CPU level (pyfastpeft/cpu_dispatch.h)

constexpr int64_t kGrain = 32768;

// Calls on_const(c, begin, end) for stretches of elements in group c, or on_linear(c0, begin, end) for
// stretches whose element e is in group c0 + (e - begin), covering [begin, end) of x.
template <class Const, class Linear>
void for_each_stretch(const QuantLayout& L, int64_t begin, int64_t end, Const&& on_const, Linear&& on_linear) {
  int64_t e = begin;
  if (L.post > 1 || L.channels == 1) {
    while (e < end) {
      const int64_t row = e / L.post;
      const int64_t stop = std::min(end, (row + 1) * L.post);
      on_const(row % L.channels, e, stop);
      e = stop;
    }
  } else {
    while (e < end) {
      const int64_t c0 = e % L.channels;
      const int64_t stop = std::min(end, e + (L.channels - c0));
      on_linear(c0, e, stop);
      e = stop;
    }
  }
}

inline bool use_group_schedule(const QuantLayout& L) {
  return L.pre == 1 && L.channels >= 2 * at::get_num_threads();
}

// Runs body(t, begin, end) on `tasks` contiguous element ranges in parallel, t the range's index.
template <class F>
void for_each_task(int64_t numel, int64_t tasks, F&& body) {
  at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) body(t, numel * t / tasks, numel * (t + 1) / tasks);
  });
}

inline int64_t task_count(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (numel + kGrain - 1) / kGrain));
}

// Floating-point reductions vectorize only with independent lanes (the compiler may not reassociate).
constexpr int kLanes = 16;

template <typename T, typename acc_t>
struct MinMax {
  acc_t lo = std::numeric_limits<acc_t>::infinity();
  acc_t hi = -std::numeric_limits<acc_t>::infinity();
  acc_t probe = 0;  // Σ x·0: NaN once the group held a NaN or ±inf
  void add(acc_t v) {
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    probe += v * acc_t(0);
  }
  void scan(const T* x, int64_t n) {
    acc_t l[kLanes], h[kLanes], pr[kLanes];
    for (int k = 0; k < kLanes; ++k) l[k] = lo, h[k] = hi, pr[k] = 0;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const acc_t v = static_cast<acc_t>(x[i + k]);
        l[k] = v < l[k] ? v : l[k];
        h[k] = v > h[k] ? v : h[k];
        pr[k] += v * acc_t(0);
      }
    }
    for (int k = 0; k < kLanes; ++k) {
      lo = l[k] < lo ? l[k] : lo;
      hi = h[k] > hi ? h[k] : hi;
      probe += pr[k];
    }
    for (; i < n; ++i) add(static_cast<acc_t>(x[i]));
  }
};

#if defined(__AVX2__)
// float32: the same lanes in two ymm registers (min_ps / max_ps are exactly `v < l ? v : l` / `v > h ? v : h`).
template <>
inline void MinMax<float, float>::scan(const float* x, int64_t n) {
  __m256 l0 = _mm256_set1_ps(lo), l1 = l0, h0 = _mm256_set1_ps(hi), h1 = h0;
  __m256 p0 = _mm256_setzero_ps(), p1 = p0;
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    l0 = _mm256_min_ps(v0, l0), l1 = _mm256_min_ps(v1, l1);
    h0 = _mm256_max_ps(v0, h0), h1 = _mm256_max_ps(v1, h1);
    p0 = _mm256_add_ps(p0, _mm256_mul_ps(v0, zero)), p1 = _mm256_add_ps(p1, _mm256_mul_ps(v1, zero));
  }
  alignas(32) float l[16], h[16], pr[16];
  _mm256_store_ps(l, l0), _mm256_store_ps(l + 8, l1);
  _mm256_store_ps(h, h0), _mm256_store_ps(h + 8, h1);
  _mm256_store_ps(pr, p0), _mm256_store_ps(pr + 8, p1);
  for (int k = 0; k < 16; ++k) {
    lo = l[k] < lo ? l[k] : lo;
    hi = h[k] > hi ? h[k] : hi;
    probe += pr[k];
  }
  for (; i < n; ++i) add(x[i]);
}
#endif

// out[i] = (clamp(rint(x·inv) + z) - z)·s over a stretch of constant group.
template <typename T, typename acc_t>
inline void quantize_const(const T* x, T* out, int64_t n, acc_t s, int32_t zp, int qmin, int qmax) {
  const acc_t inv = inverse_scale(s), z = static_cast<acc_t>(zp);
  const acc_t lo = static_cast<acc_t>(qmin), hi = static_cast<acc_t>(qmax);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t q = round_half_even(static_cast<acc_t>(x[i]) * inv) + z;
    out[i] = static_cast<T>((clamp_code(q, lo, hi) - z) * s);
  }
}

#if defined(__AVX2__)
// float32 stretches in explicit AVX2, 8 elements per step, with the scalar loop's arithmetic (roundps is
// round-half-even; max_ps/min_ps map a NaN code to a bound, but a NaN code only occurs in a group whose
// scale is NaN, so the output is NaN either way). Streaming stores were measured slower on our machines
// than plain stores, so the stores are plain.
inline void quantize_const(const float* x, float* out, int64_t n, float s, int32_t zp, int qmin, int qmax) {
  int64_t i = 0;
  {
    const float inv = inverse_scale(s), z = static_cast<float>(zp);
    const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z), vs = _mm256_set1_ps(s);
    const __m256 vlo = _mm256_set1_ps(static_cast<float>(qmin)), vhi = _mm256_set1_ps(static_cast<float>(qmax));
    for (; i + 8 <= n; i += 8) {
      const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
      __m256 q = _mm256_add_ps(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
      q = _mm256_min_ps(_mm256_max_ps(q, vlo), vhi);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
    }
  }
  quantize_const<float, float>(x + i, out + i, n - i, s, zp, qmin, qmax);
}
#endif

// STE backward over a stretch of constant group: dx = dy where qmin <= rint(x·inv) + z <= qmax, else 0.
template <typename T, typename acc_t>
inline void ste_const(const T* dy, const T* x, T* dx, int64_t n, acc_t inv, acc_t z, acc_t lo, acc_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t q = round_half_even(static_cast<acc_t>(x[i]) * inv) + z;
    dx[i] = (q >= lo && q <= hi) ? dy[i] : T(0);
  }
}

#if defined(__AVX2__)
inline void ste_const(const float* dy, const float* x, float* dx, int64_t n, float inv, float z, float lo, float hi) {
  int64_t i = 0;
  {
    const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    for (; i + 8 <= n; i += 8) {
      const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
      const __m256 q = _mm256_add_ps(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
      const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(q, vlo, _CMP_GE_OQ), _mm256_cmp_ps(q, vhi, _CMP_LE_OQ));
      _mm256_storeu_ps(dx + i, _mm256_and_ps(keep, _mm256_loadu_ps(dy + i)));
    }
  }
  ste_const<float, float>(dy + i, x + i, dx + i, n - i, inv, z, lo, hi);
}
#endif

template <typename T, typename acc_t>
inline void quantize_linear(const T* x, T* out, int64_t n, const acc_t* s, const acc_t* inv, const int32_t* zp, int qmin,
                            int qmax) {
  const acc_t lo = static_cast<acc_t>(qmin), hi = static_cast<acc_t>(qmax);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t z = static_cast<acc_t>(zp[i]);
    const acc_t q = round_half_even(static_cast<acc_t>(x[i]) * inv[i]) + z;
    out[i] = static_cast<T>((clamp_code(q, lo, hi) - z) * s[i]);
  }
}

// Elementwise out = fq(x; scale, zero_point) for any layout.
template <typename T>
void apply(const T* x, T* out, const acc_type<T>* scale, const int32_t* zp, const QuantLayout& L, int qmin, int qmax) {
  using acc_t = acc_type<T>;
  std::vector<acc_t> inv;
  if (L.post == 1 && L.channels > 1) {
    inv.resize(L.channels);
    for (int64_t c = 0; c < L.channels; ++c) inv[c] = inverse_scale(scale[c]);
  }
  at::parallel_for(0, L.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_each_stretch(
        L, begin, end,
        [&](int64_t c, int64_t b, int64_t e) { quantize_const(x + b, out + b, e - b, scale[c], zp[c], qmin, qmax); },
        [&](int64_t c0, int64_t b, int64_t e) {
          quantize_linear(x + b, out + b, e - b, scale + c0, inv.data() + c0, zp + c0, qmin, qmax);
        });
  });
}

template <typename T>
void fake_quantize(const FakeQuantParams& p) {
  using acc_t = acc_type<T>;
  const QuantLayout& L = p.layout;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  acc_t* scale = static_cast<acc_t*>(p.scale);
  if (use_group_schedule(L)) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, L.post));
    at::parallel_for(0, L.channels, grain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const T* xc = x + c * L.post;
        MinMax<T, acc_t> mm;
        mm.scan(xc, L.post);
        group_qparams(mm.lo, mm.hi, mm.probe, p.symmetric, p.qmin, p.qmax, scale + c, p.zero_point + c);
        quantize_const(xc, out + c * L.post, L.post, scale[c], p.zero_point[c], p.qmin, p.qmax);
      }
      });
    return;
  }
  const int64_t C = L.channels, tasks = task_count(L.numel());
  std::vector<MinMax<T, acc_t>> part(tasks * C);
  for_each_task(L.numel(), tasks, [&](int64_t t, int64_t begin, int64_t end) {
    MinMax<T, acc_t>* mine = part.data() + t * C;
    for_each_stretch(
        L, begin, end, [&](int64_t c, int64_t b, int64_t e) { mine[c].scan(x + b, e - b); },
        [&](int64_t c0, int64_t b, int64_t e) {
          for (int64_t i = 0; i < e - b; ++i) mine[c0 + i].add(static_cast<acc_t>(x[b + i]));
        });
  });
  at::parallel_for(0, C, 1024, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      MinMax<T, acc_t> m;
      for (int64_t t = 0; t < tasks; ++t) {
        const MinMax<T, acc_t>& o = part[t * C + c];
        m.lo = o.lo < m.lo ? o.lo : m.lo;
        m.hi = o.hi > m.hi ? o.hi : m.hi;
        m.probe += o.probe;
      }
      group_qparams(m.lo, m.hi, m.probe, p.symmetric, p.qmin, p.qmax, scale + c, p.zero_point + c);
    }
  });
  apply<T>(x, out, scale, p.zero_point, L, p.qmin, p.qmax);
}

template <typename T>
void fake_quantize_backward(const FakeQuantBackwardParams& p) {
  using acc_t = acc_type<T>;
  const QuantLayout& L = p.layout;
  const T* dy = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.grad_x);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t lo = static_cast<acc_t>(p.qmin), hi = static_cast<acc_t>(p.qmax);
  at::parallel_for(0, L.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_each_stretch(
        L, begin, end,
        [&](int64_t c, int64_t b, int64_t e) {
          const acc_t inv = inverse_scale(scale[c]), z = static_cast<acc_t>(p.zero_point[c]);
          ste_const(dy + b, x + b, dx + b, e - b, inv, z, lo, hi);
        },
        [&](int64_t c0, int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const int64_t c = c0 + (i - b);
            ste_const(dy + i, x + i, dx + i, 1, inverse_scale(scale[c]), static_cast<acc_t>(p.zero_point[c]), lo, hi);
          }
        });
  });
}

// LSQ backward over one stretch of group c: writes dx (unless nullptr) and adds the stretch's Σ ds and
// Σ dz to *ds, *dz. Sums run in double lanes: per-tensor groups hold millions of elements.
template <typename T, typename acc_t>
inline void lsq_stretch(const T* dy, const T* x, T* dx, int64_t n, acc_t s, int32_t zp, int qmin, int qmax, double* ds,
                        double* dz) {
  const acc_t inv = inverse_scale(s), z = static_cast<acc_t>(zp);
  const acc_t lo = static_cast<acc_t>(qmin), hi = static_cast<acc_t>(qmax);
  double sum_in[kLanes] = {}, sum_lo[kLanes] = {}, sum_hi[kLanes] = {};
  auto element = [&](int64_t i, int k) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    const acc_t t = static_cast<acc_t>(x[i]) * inv;
    const acc_t r = round_half_even(t);
    const acc_t q = r + z;
    const bool below = q < lo, above = q > hi;
    sum_in[k] += (below || above) ? 0.0 : static_cast<double>(g * (r - t));
    sum_lo[k] += below ? static_cast<double>(g) : 0.0;
    sum_hi[k] += above ? static_cast<double>(g) : 0.0;
    return below || above;
  };
  int64_t i = 0;
  if (dx != nullptr) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) dx[i + k] = element(i + k, k) ? T(0) : dy[i + k];
    }
    for (; i < n; ++i) dx[i] = element(i, 0) ? T(0) : dy[i];
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) element(i + k, k);
    }
    for (; i < n; ++i) element(i, 0);
  }
  double in = 0, below = 0, above = 0;
  for (int k = 0; k < kLanes; ++k) in += sum_in[k], below += sum_lo[k], above += sum_hi[k];
  *ds += in + below * (qmin - zp) + above * (qmax - zp);
  *dz += -(below + above) * static_cast<double>(s);
}

#if defined(__AVX2__)
// float32 LSQ stretch in AVX2: float lanes summed over blocks of kLsqBlock elements, each block's sums
// added to double accumulators, so long (per-tensor) groups keep double-precision totals.
constexpr int64_t kLsqBlock = 1024;

inline double horizontal_sum(__m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  double total = 0;
  for (float e : f) total += e;
  return total;
}

inline void lsq_stretch(const float* dy, const float* x, float* dx, int64_t n, float s, int32_t zp, int qmin, int qmax,
                        double* ds, double* dz) {
  const float inv = inverse_scale(s), z = static_cast<float>(zp);
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z);
  const __m256 vlo = _mm256_set1_ps(static_cast<float>(qmin)), vhi = _mm256_set1_ps(static_cast<float>(qmax));
  double sum_in = 0, sum_lo = 0, sum_hi = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    const int64_t stop = std::min(n - (n - i) % 8, i + kLsqBlock);
    __m256 in = _mm256_setzero_ps(), below_sum = in, above_sum = in;
    for (; i < stop; i += 8) {
      const __m256 g = _mm256_loadu_ps(dy + i);
      const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
      const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 q = _mm256_add_ps(r, vz);
      const __m256 below = _mm256_cmp_ps(q, vlo, _CMP_LT_OQ), above = _mm256_cmp_ps(q, vhi, _CMP_GT_OQ);
      const __m256 clipped = _mm256_or_ps(below, above);
      if (dx != nullptr) _mm256_storeu_ps(dx + i, _mm256_andnot_ps(clipped, g));
      in = _mm256_add_ps(in, _mm256_andnot_ps(clipped, _mm256_mul_ps(g, _mm256_sub_ps(r, t))));
      below_sum = _mm256_add_ps(below_sum, _mm256_and_ps(below, g));
      above_sum = _mm256_add_ps(above_sum, _mm256_and_ps(above, g));
    }
    sum_in += horizontal_sum(in), sum_lo += horizontal_sum(below_sum), sum_hi += horizontal_sum(above_sum);
  }
  double tail_s = 0, tail_z = 0;
  lsq_stretch<float, float>(dy + i, x + i, dx ? dx + i : nullptr, n - i, s, zp, qmin, qmax, &tail_s, &tail_z);
  *ds += sum_in + sum_lo * (qmin - zp) + sum_hi * (qmax - zp) + tail_s;
  *dz += -(sum_lo + sum_hi) * static_cast<double>(s) + tail_z;
}
#endif

template <typename T>
void lsq_backward(const LsqBackwardParams& p) {
  using acc_t = acc_type<T>;
  const QuantLayout& L = p.layout;
  const T* dy = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.grad_x);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  acc_t* dscale = static_cast<acc_t*>(p.grad_scale);
  acc_t* dzero = static_cast<acc_t*>(p.grad_zero_point);
  const int64_t C = L.channels;
  auto finish = [&](int64_t c, double ds, double dz) {
    dscale[c] = static_cast<acc_t>(ds * p.grad_factor);
    if (dzero != nullptr) dzero[c] = static_cast<acc_t>(dz * p.grad_factor);
  };
  if (use_group_schedule(L)) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, L.post));
    at::parallel_for(0, C, grain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double ds = 0, dz = 0;
        const int64_t o = c * L.post;
        lsq_stretch(dy + o, x + o, dx ? dx + o : nullptr, L.post, scale[c], p.zero_point[c], p.qmin, p.qmax, &ds, &dz);
        finish(c, ds, dz);
      }
    });
    return;
  }
  // Per-thread [tasks, C] partial sums in double: the only temporaries, independent of numel.
  const int64_t tasks = task_count(L.numel());
  std::vector<double> part_s(tasks * C, 0.0), part_z(tasks * C, 0.0);
  for_each_task(L.numel(), tasks, [&](int64_t t, int64_t begin, int64_t end) {
    double* ms = part_s.data() + t * C;
    double* mz = part_z.data() + t * C;
    for_each_stretch(
        L, begin, end,
        [&](int64_t c, int64_t b, int64_t e) {
          lsq_stretch(dy + b, x + b, dx ? dx + b : nullptr, e - b, scale[c], p.zero_point[c], p.qmin, p.qmax, ms + c,
                      mz + c);
        },
        [&](int64_t c0, int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const int64_t c = c0 + (i - b);
            lsq_stretch(dy + i, x + i, dx ? dx + i : nullptr, 1, scale[c], p.zero_point[c], p.qmin, p.qmax, ms + c,
                        mz + c);
          }
        });
  });
  for (int64_t c = 0; c < C; ++c) {
    double ds = 0, dz = 0;
    for (int64_t t = 0; t < tasks; ++t) ds += part_s[t * C + c], dz += part_z[t * C + c];
    finish(c, ds, dz);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastpeft::quant_cpu
