// CPU kernel of the distillation family, compiled once per capability level (see
// pyfastpeft/cpu_dispatch.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "distill.h"
#include "distill_kernels_cpu.h"
#include "distill_simd.h"
#include "pyfastpeft/dispatch.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

// Running (max, Σ exp(x − max)) of an online softmax, merged one tile at a time.
template <typename A>
struct OnlineSoftmax {
  A max = -std::numeric_limits<A>::infinity();
  A sum = 0;
  // Moves to max(max, tile_max), rescaling the sum, and returns the new max.
  A rebase(A tile_max) {
    if (tile_max > max) {
      sum = max == -std::numeric_limits<A>::infinity() ? A(0) : sum * std::exp(max - tile_max);
      max = tile_max;
    }
    return max;
  }
  A logsumexp() const { return max + std::log(sum); }
};

// Per-thread scratch rows (float32, float64 for float64 inputs): z = s/T, u = t/T and, when the
// cross-entropy needs softmax(s) at T != 1, w = s.
template <typename A>
struct RowScratch {
  std::vector<A> z, u, w;
  explicit RowScratch(int64_t vocab) : z(vocab), u(vocab), w(vocab) {}
};

// One row of the loss (see distill.h). The row is read from memory once, in 512-element tiles: each
// tile is converted into the scratch rows and folded into the online-softmax statistics (sweep 1).
// The later sweeps (the divergence and the gradient) run over the scratch rows, which stay in cache.
constexpr int64_t kTile = 512;

// A row whose label is ignore_index (it counts for nothing) or out of range (flagged, reported as a
// ValueError by the caller; never used as an index): its gradient zeroed, its loss 0 or NaN. Returns
// whether the row was such a row.
template <typename T, typename A>
bool skip_row(const KdLossParams& p, int64_t label, T* grad, A* row_loss) {
  const bool ignored = label == p.ignore_index;
  if (!ignored && label >= 0 && label < p.vocab) return false;
  if (!ignored) std::atomic_ref<int32_t>(*p.bad_label).store(1, std::memory_order_relaxed);
  *row_loss = ignored ? A(0) : std::numeric_limits<A>::quiet_NaN();
  if (grad != nullptr) std::fill(grad, grad + p.vocab, T(0));
  return true;
}

template <typename T>
void kd_loss_row(const KdLossParams& p, int64_t row, int64_t n_valid, RowScratch<acc_type<T>>& scratch) {
  using A = acc_type<T>;
  const int64_t V = p.vocab;
  const T* s = static_cast<const T*>(p.student) + row * p.student_stride;
  const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_stride;
  T* grad = p.grad == nullptr ? nullptr : static_cast<T*>(p.grad) + row * V;
  A* row_loss = static_cast<A*>(p.row_loss) + row;
  A* z = scratch.z.data();
  A* u = scratch.u.data();
  A* w = scratch.w.data();

  int64_t label = -1;
  if (p.labels != nullptr) {
    label = p.labels[row];
    if (skip_row(p, label, grad, row_loss)) return;
  }
  const A temperature = static_cast<A>(p.temperature);
  const A inv_T = A(1) / temperature;
  const A alpha = static_cast<A>(p.alpha);
  const bool with_ce = alpha != A(0);
  const bool ce_on_z = p.temperature == 1.0;  // softmax(s) = softmax(z): one set of statistics serves both
  const bool keep_w = with_ce && !ce_on_z;

  // Sweep 1: online softmax statistics of z, u and (keep_w) of s itself, tile by tile.
  OnlineSoftmax<A> sz, su, ss;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int64_t n = std::min(kTile, V - j0);
    A* zt = z + j0;
    A* ut = u + j0;
    A* wt = w + j0;
    for (int64_t j = 0; j < n; ++j) {
      zt[j] = static_cast<A>(s[j0 + j]) * inv_T;
      ut[j] = static_cast<A>(t[j0 + j]) * inv_T;
    }
    constexpr A kNegInf = -std::numeric_limits<A>::infinity();
    const A mz = sz.rebase(simd::max_of(zt, n));
    const A mu = su.rebase(simd::max_of(ut, n));
    // While every logit so far is -inf (masked) the sum stays 0: exp(-inf - -inf) would be NaN.
    if (mz != kNegInf) {
      sz.sum += simd::sweep_sum<A>(n, [&](int64_t j, auto tag) { return simd::exp(simd::load(tag, zt + j) - mz); });
    }
    if (mu != kNegInf) {
      su.sum += simd::sweep_sum<A>(n, [&](int64_t j, auto tag) { return simd::exp(simd::load(tag, ut + j) - mu); });
    }
    if (keep_w) {
      for (int64_t j = 0; j < n; ++j) wt[j] = static_cast<A>(s[j0 + j]);
      const A ms = ss.rebase(simd::max_of(wt, n));
      if (ms != kNegInf) {
        ss.sum += simd::sweep_sum<A>(n, [&](int64_t j, auto tag) { return simd::exp(simd::load(tag, wt + j) - ms); });
      }
    }
  }
  const A lse_z = sz.logsumexp(), lse_u = su.logsumexp();
  const A lse_s = keep_w ? ss.logsumexp() : lse_z * temperature;
  const A ce = !with_ce ? A(0) : (ce_on_z ? lse_z - z[label] : lse_s - w[label]);

  const A scale = A(1) / static_cast<A>(std::max<int64_t>(n_valid, 1));
  const A c_ce = alpha * scale;                          // on softmax(s) − onehot(label)
  const A c_kd = (A(1) - alpha) * temperature * scale;   // on ∂D/∂z
  // c_ce·softmax(s)_j given ps_j = softmax(z)_j (w is still in cache when T != 1).
  auto ce_grad = [&](int64_t j, auto tag, auto ps) {
    if (!with_ce) return decltype(ps){} * A(0);
    if (ce_on_z) return ps * c_ce;
    return simd::exp(simd::load(tag, w + j) - lse_s) * c_ce;
  };

  // Sweep 2: the divergence D. The forward KL also writes the gradient here (ps − pt needs nothing
  // beyond the row's statistics); reverse KL and JS leave ps in z and their per-element factor in u.
  A D = 0;
  A centre = 0;
  if (p.divergence == Divergence::ForwardKL && grad == nullptr) {
    D = simd::sweep_sum<A>(V, [&](int64_t j, auto tag) {
      const auto lu = simd::load(tag, u + j) - lse_u;
      const auto pt = simd::exp(lu);
      return pt * simd::where_positive(pt, lu - (simd::load(tag, z + j) - lse_z));
    });
  } else if (p.divergence == Divergence::ForwardKL) {
    D = simd::sweep_sum<A>(V, [&](int64_t j, auto tag) {
      const auto lz = simd::load(tag, z + j) - lse_z;
      const auto lu = simd::load(tag, u + j) - lse_u;
      const auto ps = simd::exp(lz), pt = simd::exp(lu);
      simd::store_as(tag, grad + j, (ps - pt) * c_kd + ce_grad(j, tag, ps));
      return pt * simd::where_positive(pt, lu - lz);
    });
  } else if (p.divergence == Divergence::ReverseKL) {
    D = simd::sweep_sum<A>(V, [&](int64_t j, auto tag) {
      const auto lz = simd::load(tag, z + j) - lse_z;
      const auto ps = simd::exp(lz);
      const auto d = simd::where_positive(ps, lz - (simd::load(tag, u + j) - lse_u));
      simd::store(tag, z + j, ps);
      simd::store(tag, u + j, d);
      return ps * d;
    });
    centre = D;  // ∂D/∂z = ps ⊙ ((ls − lt) − D)
  } else {
    // JS with m = ½(ps + pt): D = Σ ps·g + ½pt·(lt − log m), g = ½(ls − log m); ∂D/∂z = ps ⊙ (g − Σ ps·g).
    D = simd::sweep_sum<A>(V, [&](int64_t j, auto tag) {
      const auto lz = simd::load(tag, z + j) - lse_z;
      const auto lu = simd::load(tag, u + j) - lse_u;
      const auto ps = simd::exp(lz), pt = simd::exp(lu);
      const auto lm = simd::log((ps + pt) * A(0.5));
      const auto g = simd::where_positive(ps, (lz - lm) * A(0.5));
      simd::store(tag, z + j, ps);
      simd::store(tag, u + j, g);
      return ps * g + pt * simd::where_positive(pt, (lu - lm) * A(0.5));
    });
    if (grad != nullptr) {
      centre = simd::sweep_sum<A>(V, [&](int64_t j, auto tag) { return simd::load(tag, z + j) * simd::load(tag, u + j); });
    }
  }
  if (grad != nullptr && p.divergence != Divergence::ForwardKL) {
    // Sweep 3: the gradient from ps (in z) and the per-element factor (in u).
    simd::sweep<A>(V, [&](int64_t j, auto tag) {
      const auto ps = simd::load(tag, z + j);
      simd::store_as(tag, grad + j, ps * (simd::load(tag, u + j) - centre) * c_kd + ce_grad(j, tag, ps));
    });
  }
  if (grad != nullptr && with_ce) grad[label] = static_cast<T>(static_cast<A>(grad[label]) - c_ce);
  *row_loss = (alpha * ce + (A(1) - alpha) * temperature * temperature * D) * scale;
}

// One row of the plain cross-entropy (no teacher, alpha = 1, temperature 1):
//   row_loss = (logsumexp(s) − s[label]) / n_valid,  grad = (softmax(s) − onehot(label)) / n_valid.
// Two sweeps: the online softmax statistics, tile by tile from memory, then the gradient, which re-reads
// the row from cache (a float32 row of a 50k vocabulary is 200 KB) and may overwrite it in place.
// Float32 and float64 rows are read where they are; 16-bit rows are widened into the scratch row first.
template <typename T>
void ce_row(const KdLossParams& p, int64_t row, int64_t n_valid, std::vector<acc_type<T>>& scratch) {
  using A = acc_type<T>;
  const int64_t V = p.vocab;
  const T* s = static_cast<const T*>(p.student) + row * p.student_stride;
  T* grad = p.grad == nullptr ? nullptr : static_cast<T*>(p.grad) + row * V;
  A* row_loss = static_cast<A*>(p.row_loss) + row;
  const int64_t label = p.labels[row];
  if (skip_row(p, label, grad, row_loss)) return;
  constexpr bool kWide = std::is_same_v<T, A>;
  const A* z = nullptr;
  if constexpr (kWide) {
    z = s;
  } else {
    z = scratch.data();
  }
  const A s_label = static_cast<A>(s[label]);  // read before the gradient may overwrite it
  OnlineSoftmax<A> stats;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int64_t n = std::min(kTile, V - j0);
    if constexpr (!kWide) {
      for (int64_t j = 0; j < n; ++j) scratch[j0 + j] = static_cast<A>(s[j0 + j]);
    }
    const A* zt = z + j0;
    const A m = stats.rebase(simd::max_of(zt, n));
    // While every logit so far is -inf (masked) the sum stays 0: exp(-inf - -inf) would be NaN.
    if (m != kNegInf) {
      stats.sum += simd::sweep_sum<A>(n, [&](int64_t j, auto tag) { return simd::exp(simd::load(tag, zt + j) - m); });
    }
  }
  const A lse = stats.logsumexp();
  const A scale = A(1) / static_cast<A>(std::max<int64_t>(n_valid, 1));
  if (grad != nullptr) {
    simd::sweep<A>(V, [&](int64_t j, auto tag) {
      simd::store_as(tag, grad + j, simd::exp(simd::load(tag, z + j) - lse) * scale);
    });
    grad[label] = static_cast<T>(static_cast<A>(grad[label]) - scale);
  }
  *row_loss = (lse - s_label) * scale;
}

template <typename T>
void kd_loss_rows_kernel(const KdLossParams& p) {
  using A = acc_type<T>;
  const int64_t n_valid = *p.n_valid;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  if (p.teacher == nullptr) {  // the plain cross-entropy (fused_linear_cross_entropy)
    at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(std::is_same_v<T, A> ? 0 : p.vocab);
      for (int64_t row = begin; row < end; ++row) ce_row<T>(p, row, n_valid, scratch);
    });
    return;
  }
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    RowScratch<A> scratch(p.vocab);
    for (int64_t row = begin; row < end; ++row) kd_loss_row<T>(p, row, n_valid, scratch);
  });
}

void kd_loss_rows(const KdLossParams& params) {
  if (params.n_rows == 0) return;
  switch (params.dtype) {
    case DType::Float64: return kd_loss_rows_kernel<double>(params);
    case DType::Float32: return kd_loss_rows_kernel<float>(params);
    case DType::BFloat16: return kd_loss_rows_kernel<at::BFloat16>(params);
    case DType::Float16: return kd_loss_rows_kernel<at::Half>(params);
  }
}

}  // namespace

constinit const DistillCpuKernels distill_cpu_kernels{&kd_loss_rows};

}  // namespace pyfastpeft::CPU_CAPABILITY
