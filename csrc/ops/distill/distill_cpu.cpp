// CPU kernels of the distillation family and their registration.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "distill.h"
#include "distill_impl.h"
#include "pyfastpeft/dispatch.h"

namespace pyfastpeft {
namespace {

// exp and log the compiler can vectorise (std::exp/std::log calls block auto-vectorisation); Cephes'
// single-precision polynomials, within 2 ulp on the ranges a softmax sees. float64 keeps std::exp/log.
inline float vec_exp(float x) {
  // exp(x) = 2^n · e^r with n = round(x·log2 e), |r| <= ln2/2; below -87 the result is 0 (underflow).
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

inline float vec_log(float x) {
  // x = m·2^e with m in [sqrt(1/2), sqrt(2)); log x = log m + e·ln2. x <= 0 is not expected (a mean of
  // two probabilities); 0 and subnormals come out near log(FLT_MIN), which only ever multiplies a 0.
  const int32_t bits = std::bit_cast<int32_t>(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

inline double vec_exp(double x) { return std::exp(x); }
inline double vec_log(double x) { return std::log(x); }

// Sum over i < n of f(i), in kLanes independent partial sums so the loop vectorises.
constexpr int64_t kLanes = 16;
template <typename A, class F>
inline A lane_sum(int64_t n, F&& f) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  }
  A total = 0;
  for (; i < n; ++i) total += f(i);
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

template <typename A>
inline A lane_max(const A* x, int64_t n) {
  A acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<A>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
  }
  A m = -std::numeric_limits<A>::infinity();
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  for (int64_t l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// Running (max, Σ exp(x − max)) of an online softmax, merged one tile at a time.
template <typename A>
struct OnlineSoftmax {
  A max = -std::numeric_limits<A>::infinity();
  A sum = 0;
  // Moves to the new max `m` (rescaling the sum) and returns it.
  A rebase(A tile_max) {
    if (tile_max > max) {
      sum = max == -std::numeric_limits<A>::infinity() ? A(0) : sum * std::exp(max - tile_max);
      max = tile_max;
    }
    return max;
  }
  A logsumexp() const { return max + std::log(sum); }
};

// One row of the loss (see distill.h). The row is read from memory once, as 512-element tiles: each
// tile is converted into the float scratch rows z = s/T, u = t/T and folded into the online softmax
// statistics. The later sweeps (log-probabilities, the divergence, the gradient) run over the scratch
// rows, which stay in cache.
constexpr int64_t kTile = 512;

template <typename T>
void kd_loss_row(const KdLossParams& p, int64_t row, int64_t n_valid, acc_type<T>* z, acc_type<T>* u) {
  using A = acc_type<T>;
  const int64_t V = p.vocab;
  const T* s = static_cast<const T*>(p.student) + row * p.student_stride;
  const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_stride;
  T* grad = p.grad == nullptr ? nullptr : static_cast<T*>(p.grad) + row * V;
  A* row_loss = static_cast<A*>(p.row_loss) + row;

  int64_t label = -1;
  if (p.labels != nullptr) {
    label = p.labels[row];
    if (label == p.ignore_index) {
      *row_loss = 0;
      if (grad != nullptr) std::fill(grad, grad + V, T(0));
      return;
    }
    if (label < 0 || label >= V) {
      std::atomic_ref<int32_t>(*p.bad_label).store(1, std::memory_order_relaxed);  // reported as a ValueError by the caller; never used as an index
      *row_loss = std::numeric_limits<A>::quiet_NaN();
      if (grad != nullptr) std::fill(grad, grad + V, T(0));
      return;
    }
  }
  const A inv_T = A(1) / static_cast<A>(p.temperature);
  const A alpha = static_cast<A>(p.alpha);
  const bool with_ce = alpha != A(0);
  const bool ce_on_z = p.temperature == 1.0;  // then softmax(s) = softmax(z) and one set of statistics serves both

  // Sweep 1: online softmax statistics of z, u and (when T != 1) of s itself for the cross-entropy.
  OnlineSoftmax<A> sz, su, ss;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int64_t n = std::min(kTile, V - j0);
    A* zt = z + j0;
    A* ut = u + j0;
    for (int64_t j = 0; j < n; ++j) {
      zt[j] = static_cast<A>(s[j0 + j]) * inv_T;
      ut[j] = static_cast<A>(t[j0 + j]) * inv_T;
    }
    const A tile_max_z = lane_max(zt, n);
    const A mz = sz.rebase(tile_max_z);
    const A mu = su.rebase(lane_max(ut, n));
    sz.sum += lane_sum<A>(n, [&](int64_t j) { return vec_exp(zt[j] - mz); });
    su.sum += lane_sum<A>(n, [&](int64_t j) { return vec_exp(ut[j] - mu); });
    if (with_ce && !ce_on_z) {
      // max(s) = T·max(z) up to rounding; any upper bound near the max keeps the sum well scaled.
      const A ms = ss.rebase(tile_max_z * static_cast<A>(p.temperature));
      ss.sum += lane_sum<A>(n, [&](int64_t j) { return vec_exp(static_cast<A>(s[j0 + j]) - ms); });
    }
  }
  const A lse_z = sz.logsumexp(), lse_u = su.logsumexp();
  const A lse_s = ce_on_z ? lse_z * static_cast<A>(p.temperature) : ss.logsumexp();
  const A ce = with_ce ? (ce_on_z ? (lse_z - z[label]) : (lse_s - static_cast<A>(s[label]))) : A(0);

  // Sweep 2: the divergence (and, for the forward KL, the gradient as well).
  const A scale = A(1) / static_cast<A>(std::max<int64_t>(n_valid, 1));
  const A c_ce = alpha * scale;                                               // on softmax(s) − onehot
  const A c_kd = (A(1) - alpha) * static_cast<A>(p.temperature) * scale;   // on ∂D/∂z
  // softmax(s)_j, recomputed from the input row when T != 1 (the row is still in cache).
  auto q = [&](int64_t j, A ps) {
    return ce_on_z ? ps : vec_exp(static_cast<A>(s[j]) - lse_s);
  };
  A D = 0;
  if (p.divergence == Divergence::ForwardKL) {
    if (grad == nullptr) {
      D = lane_sum<A>(V, [&](int64_t j) {
        const A lz = z[j] - lse_z, lu = u[j] - lse_u;
        return vec_exp(lu) * (lu - lz);
      });
    } else {
      // ∂D/∂z = ps − pt needs nothing beyond the row's statistics: loss and gradient in one sweep.
      D = lane_sum<A>(V, [&](int64_t j) {
        const A lz = z[j] - lse_z, lu = u[j] - lse_u;
        const A ps = vec_exp(lz), pt = vec_exp(lu);
        const A g = c_kd * (ps - pt);
        grad[j] = static_cast<T>(with_ce ? g + c_ce * q(j, ps) : g);
        return pt * (lu - lz);
      });
    }
  } else if (p.divergence == Divergence::ReverseKL) {
    // Keeps ps in z and ls − lt in u for the gradient sweep.
    D = lane_sum<A>(V, [&](int64_t j) {
      const A lz = z[j] - lse_z;
      const A d = lz - (u[j] - lse_u);
      const A ps = vec_exp(lz);
      z[j] = ps;
      u[j] = d;
      return ps * d;
    });
  } else {
    // JS: keeps ps in z and g = ½(ls − log m) in u; G = Σ ps·g centres the gradient.
    A G = 0;
    A acc_d[kLanes] = {}, acc_g[kLanes] = {};
    auto js_term = [&](int64_t j, A& d_acc, A& g_acc) {
      const A lz = z[j] - lse_z, lu = u[j] - lse_u;
      const A ps = vec_exp(lz), pt = vec_exp(lu);
      const A lm = vec_log(A(0.5) * (ps + pt));
      const A g = A(0.5) * (lz - lm);
      d_acc += ps * g + A(0.5) * pt * (lu - lm);
      g_acc += ps * g;
      z[j] = ps;
      u[j] = g;
    };
    int64_t j = 0;
    for (; j + kLanes <= V; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) js_term(j + l, acc_d[l], acc_g[l]);
    }
    for (; j < V; ++j) js_term(j, D, G);
    for (int64_t l = 0; l < kLanes; ++l) {
      D += acc_d[l];
      G += acc_g[l];
    }
    if (grad != nullptr) {
      for (int64_t k = 0; k < V; ++k) u[k] -= G;
    }
  }
  if (grad != nullptr && p.divergence != Divergence::ForwardKL) {
    // Sweep 3: ∂D/∂z = ps ⊙ (u − centre), with the centre D for reverse KL (already folded into u for JS).
    const A centre = p.divergence == Divergence::ReverseKL ? D : A(0);
    for (int64_t j = 0; j < V; ++j) {
      const A g = c_kd * z[j] * (u[j] - centre);
      grad[j] = static_cast<T>(with_ce ? g + c_ce * q(j, z[j]) : g);
    }
  }
  if (grad != nullptr && with_ce) grad[label] = static_cast<T>(static_cast<A>(grad[label]) - c_ce);
  const A T2 = static_cast<A>(p.temperature * p.temperature);
  *row_loss = (alpha * ce + (A(1) - alpha) * T2 * D) * scale;
}

template <typename T>
void kd_loss_rows_kernel(const KdLossParams& p) {
  using A = acc_type<T>;
  const int64_t n_valid = *p.n_valid;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> z(p.vocab), u(p.vocab);
    for (int64_t row = begin; row < end; ++row) kd_loss_row<T>(p, row, n_valid, z.data(), u.data());
  });
}

struct CpuBackend {
  static void rows(const KdLossParams& params) { kd_loss_rows_cpu(params); }
  static bool any_bad_label(const at::Tensor& bad_label) { return *bad_label.const_data_ptr<int32_t>() != 0; }
};

}  // namespace

void kd_loss_rows_cpu(const KdLossParams& params) {
  if (params.n_rows == 0) return;
  switch (params.dtype) {
    case DType::Float64: return kd_loss_rows_kernel<double>(params);
    case DType::Float32: return kd_loss_rows_kernel<float>(params);
    case DType::BFloat16: return kd_loss_rows_kernel<at::BFloat16>(params);
    case DType::Float16: return kd_loss_rows_kernel<at::Half>(params);
  }
}

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("kd_loss", &distill::kd_loss<CpuBackend>);
  m.impl("fused_linear_kd_loss", &distill::fused_linear_kd_loss<CpuBackend>);
}

}  // namespace pyfastpeft
