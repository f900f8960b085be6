// CPU kernels of the optim family, compiled once per capability level (see pyfastpeft/cpu_dispatch.h).
//
// The float32-state update is written with ATen's Vectorized<float>: GCC does not vectorize a loop holding
// std::sqrt while -fmath-errno is on (the default), and that loop is all this file does. Its AVX2 and
// AVX-512 specialisations follow CPU_CAPABILITY_<LEVEL>, which the build sets for each level's copy.
#include <ATen/cpu/vec/functional.h>  // convert_to/from_float for 16-bit types (every level)
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "optim.h"
#include "optim_kernels_cpu.h"
#include "pyfastpeft/dispatch.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

// Work unit of the parallel loops: a slice of one tensor, so a list of many small tensors and a list
// of one huge tensor split alike over the threads.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(int64_t n_tensors, const int64_t* numel) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < n_tensors; ++i) {
    for (int64_t b = 0; b < numel[i]; b += kChunk) chunks.push_back({i, b, std::min(numel[i], b + kChunk)});
  }
  return chunks;
}

// Per-tensor scalars of one step, computed once in float64 like torch.optim.AdamW does.
struct StepScalars {
  double step_size;   // lr / (1 − β₁ᵗ)
  double bc2_sqrt;    // √(1 − β₂ᵗ)
};

// One slice of the AdamW update (semantics in optim.h). P: parameter/gradient type, S: state type.
// The operation order follows torch.optim.AdamW (lerp for m, mul then addcmul for v, addcdiv for θ)
// so float32 results agree to rounding.
template <typename P, typename S>
void adamw_slice(const AdamWParams& p, const Chunk& c, const StepScalars& s, double lr, float grad_scale) {
  using acc_t = acc_type<S>;
  const bool master = p.master != nullptr;
  P* __restrict__ param = static_cast<P*>(p.param[c.tensor]);
  const P* __restrict__ grad = static_cast<const P*>(p.grad[c.tensor]);
  S* __restrict__ m = static_cast<S*>(p.exp_avg[c.tensor]);
  S* __restrict__ v = static_cast<S*>(p.exp_avg_sq[c.tensor]);
  S* __restrict__ vmax = p.max_exp_avg_sq ? static_cast<S*>(p.max_exp_avg_sq[c.tensor]) : nullptr;
  S* __restrict__ theta_master = master ? static_cast<S*>(p.master[c.tensor]) : nullptr;
  const S* __restrict__ anchor = p.anchor ? static_cast<const S*>(p.anchor[c.tensor]) : nullptr;
  const acc_t decay = static_cast<acc_t>(1.0 - lr * p.weight_decay);
  const acc_t w1 = static_cast<acc_t>(1.0 - p.beta1), b2 = static_cast<acc_t>(p.beta2);
  const acc_t w2 = static_cast<acc_t>(1.0 - p.beta2), l2sp = static_cast<acc_t>(p.l2sp);
  const acc_t bc2_sqrt = static_cast<acc_t>(s.bc2_sqrt), eps = static_cast<acc_t>(p.eps);
  const acc_t neg_step = static_cast<acc_t>(-s.step_size), gs = static_cast<acc_t>(grad_scale);
  for (int64_t e = c.begin; e < c.end; ++e) {
    acc_t theta = master ? static_cast<acc_t>(theta_master[e]) : static_cast<acc_t>(param[e]);
    acc_t g = static_cast<acc_t>(grad[e]) * gs;
    if (anchor) g += l2sp * (theta - static_cast<acc_t>(anchor[e]));
    if (p.maximize) g = -g;
    theta *= decay;
    const acc_t m_old = static_cast<acc_t>(m[e]);
    // torch's lerp(m, g, w) for w < 0.5
    const acc_t m_new = static_cast<S>(m_old + w1 * (g - m_old));
    acc_t v_new = static_cast<S>(static_cast<acc_t>(static_cast<S>(static_cast<acc_t>(v[e]) * b2)) + w2 * g * g);
    m[e] = static_cast<S>(m_new);
    v[e] = static_cast<S>(v_new);
    if (vmax) {
      v_new = std::max(static_cast<acc_t>(vmax[e]), v_new);
      vmax[e] = static_cast<S>(v_new);
    }
    const acc_t denom = std::sqrt(v_new) / bc2_sqrt + eps;
    theta += neg_step * (m_new / denom);
    if (master) theta_master[e] = static_cast<S>(theta);
    param[e] = static_cast<P>(theta);
  }
}

// The update on float32 state with Vectorized<float>, for float32 parameters (θ is the parameter) and for
// bfloat16/float16 parameters with float32 masters (θ is the master; the parameter gets round(θ)).
// Whole vectors only; the tail goes to adamw_slice.
template <typename P>
void adamw_slice_vec(const AdamWParams& p, const Chunk& c, const StepScalars& s, double lr, float grad_scale) {
  using V = at::vec::Vectorized<float>;
  using VP = at::vec::Vectorized<P>;
  constexpr bool kMaster = !std::is_same_v<P, float>;
  P* param = static_cast<P*>(p.param[c.tensor]);
  const P* grad = static_cast<const P*>(p.grad[c.tensor]);
  float* theta_ptr = kMaster ? static_cast<float*>(p.master[c.tensor]) : reinterpret_cast<float*>(param);
  float* m = static_cast<float*>(p.exp_avg[c.tensor]);
  float* v = static_cast<float*>(p.exp_avg_sq[c.tensor]);
  float* vmax = p.max_exp_avg_sq ? static_cast<float*>(p.max_exp_avg_sq[c.tensor]) : nullptr;
  const float* anchor = p.anchor ? static_cast<const float*>(p.anchor[c.tensor]) : nullptr;
  const V decay(static_cast<float>(1.0 - lr * p.weight_decay));
  const V w1(static_cast<float>(1.0 - p.beta1)), b2(static_cast<float>(p.beta2));
  const V w2(static_cast<float>(1.0 - p.beta2)), l2sp(static_cast<float>(p.l2sp));
  const V bc2_sqrt(static_cast<float>(s.bc2_sqrt)), eps(static_cast<float>(p.eps));
  const V neg_step(static_cast<float>(-s.step_size)), gs(grad_scale), zero(0.0f);
  // θ at [e, e + V::size()) with gradient g: updates the state and returns the new θ.
  const auto update = [&](int64_t e, V g) {
    V theta = V::loadu(theta_ptr + e);
    g = g * gs;
    if (anchor) g = g + l2sp * (theta - V::loadu(anchor + e));
    if (p.maximize) g = zero - g;
    theta = theta * decay;
    const V m_old = V::loadu(m + e);
    const V m_new = m_old + w1 * (g - m_old);
    V v_new = V::loadu(v + e) * b2 + w2 * g * g;
    m_new.store(m + e);
    v_new.store(v + e);
    if (vmax) {
      v_new = at::vec::maximum(V::loadu(vmax + e), v_new);
      v_new.store(vmax + e);
    }
    theta = theta + neg_step * (m_new / (v_new.sqrt() / bc2_sqrt + eps));
    theta.store(theta_ptr + e);
    return theta;
  };
  int64_t e = c.begin;
  if constexpr (kMaster) {
    for (; e + VP::size() <= c.end; e += VP::size()) {
      auto [g0, g1] = at::vec::convert_to_float<P>(VP::loadu(grad + e));
      const V t0 = update(e, g0);
      const V t1 = update(e + V::size(), g1);
      at::vec::convert_from_float<P>(t0, t1).store(param + e);
    }
  } else {
    for (; e + V::size() <= c.end; e += V::size()) update(e, V::loadu(grad + e));
  }
  if (e < c.end) adamw_slice<P, float>(p, {c.tensor, e, c.end}, s, lr, grad_scale);
}

template <typename P, typename S>
void adamw_kernel(const AdamWParams& p) {
  const double lr = *p.lr;
  const float grad_scale = p.grad_scale ? *p.grad_scale : 1.0f;
  std::vector<StepScalars> scalars(p.n_tensors);
  for (int64_t i = 0; i < p.n_tensors; ++i) {
    const double t = static_cast<double>(*p.step[i] += 1.0f);
    scalars[i] = {lr / (1.0 - std::pow(p.beta1, t)), std::sqrt(1.0 - std::pow(p.beta2, t))};
  }
  const std::vector<Chunk> chunks = make_chunks(p.n_tensors, p.numel);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (std::is_same_v<S, float> && !std::is_same_v<P, double>) {
        adamw_slice_vec<P>(p, chunks[i], scalars[chunks[i].tensor], lr, grad_scale);
      } else {
        adamw_slice<P, S>(p, chunks[i], scalars[chunks[i].tensor], lr, grad_scale);
      }
    }
  });
}

template <typename T>
double sum_squares_slice(const T* __restrict__ x, int64_t begin, int64_t end) {
  using acc_t = acc_type<T>;
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = begin; e < end; ++e) {
    const acc_t v = static_cast<acc_t>(x[e]);
    acc += v * v;
  }
  return static_cast<double>(acc);
}

template <typename T>
void l2_norm_kernel(const L2NormParams& p) {
  const std::vector<Chunk> chunks = make_chunks(p.n_tensors, p.numel);
  std::vector<double> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      partial[i] = sum_squares_slice(static_cast<const T*>(p.data[chunks[i].tensor]), chunks[i].begin, chunks[i].end);
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  *p.out = static_cast<float>(std::sqrt(total));
}

void adamw(const AdamWParams& p) {
  const bool master = p.master != nullptr;
  switch (p.param_dtype) {
    case DType::Float64: return adamw_kernel<double, double>(p);
    case DType::Float32: return adamw_kernel<float, float>(p);
    case DType::BFloat16:
      return master ? adamw_kernel<at::BFloat16, float>(p) : adamw_kernel<at::BFloat16, at::BFloat16>(p);
    case DType::Float16: return master ? adamw_kernel<at::Half, float>(p) : adamw_kernel<at::Half, at::Half>(p);
  }
}

void l2_norm(const L2NormParams& p) {
  switch (p.dtype) {
    case DType::Float64: return l2_norm_kernel<double>(p);
    case DType::Float32: return l2_norm_kernel<float>(p);
    case DType::BFloat16: return l2_norm_kernel<at::BFloat16>(p);
    case DType::Float16: return l2_norm_kernel<at::Half>(p);
  }
}

}  // namespace

constinit const OptimCpuKernels optim_cpu_kernels{&adamw, &l2_norm};

}  // namespace pyfastpeft::CPU_CAPABILITY
