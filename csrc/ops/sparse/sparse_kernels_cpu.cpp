// CPU kernel of the sparse family, compiled once per capability level (see pyfastpeft/cpu_dispatch.h).
//
// Dot products use ATen's Vectorized (its AVX2 or AVX-512 specialisation in those levels' copies, see
// optim_kernels_cpu.cpp): GCC does not vectorize a float reduction without -ffast-math.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "pyfastpeft/dispatch.h"
#include "sparse.h"
#include "sparse_kernels_cpu.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

// Σ_i a[i]·b[i] over n contiguous elements.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(V::loadu(a + i + W), V::loadu(b + i + W), acc1);
  }
  for (; i + W <= n; i += W) acc0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc0);
  T total = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Copies rows [n0, n0 + len) and features [f_begin, f_end) of the row-major src [n_rows, features] into
// dst [f_end - f_begin, len] (float or double), in 32×32 tiles so both sides move a cache line at a time.
template <typename T, typename In>
void transpose_slab(const In* src, int64_t features, int64_t f_begin, int64_t f_end, int64_t n0, int64_t len,
                    T* dst) {
  constexpr int64_t kTile = 32;
  for (int64_t f0 = f_begin; f0 < f_end; f0 += kTile) {
    const int64_t f1 = std::min(f_end, f0 + kTile);
    for (int64_t nb = 0; nb < len; nb += kTile) {
      const int64_t n1 = std::min(len, nb + kTile);
      for (int64_t n = nb; n < n1; ++n) {
        const In* row = src + (n0 + n) * features;
        for (int64_t f = f0; f < f1; ++f) dst[(f - f_begin) * len + n] = static_cast<T>(row[f]);
      }
    }
  }
}

// dΔ_j = Σ_slabs dyᵀ[r_j, slab]·xᵀ[c_j, slab] (sparse.h). Each thread owns a range of j (so a range of
// rows, the indices being sorted) and walks N in slabs sized so the x slab (in × slab) stays in a 1 MiB
// share of the L2 cache, the column rows being read in random order: it transposes its rows of dy and all of
// x for the slab into its own buffers, then adds one dot product per j. One parallel region, no
// barrier per slab; the x slab is transposed once per thread.

template <typename T, typename In, typename I>
void sampled_grad_kernel(const SampledGradParams& p) {
  const In* gy = static_cast<const In*>(p.grad_y);
  const In* x = static_cast<const In*>(p.x);
  const I* idx = static_cast<const I*>(p.indices);
  In* out = static_cast<In*>(p.out);
  const int64_t n = p.n_rows, in = p.in_features;
  const int64_t grain = std::max<int64_t>(1024, (p.k + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, p.k, grain, [&](int64_t begin, int64_t end) {
    const int64_t row_begin = static_cast<int64_t>(idx[begin]) / in;
    const int64_t row_end = static_cast<int64_t>(idx[end - 1]) / in + 1;
    const int64_t slab = std::min(n, std::clamp<int64_t>((int64_t{1} << 20) / (in * int64_t{sizeof(T)}) / 16 * 16, 16, 256));
    std::vector<T> acc(end - begin, T(0));
    std::vector<T> gy_slab((row_end - row_begin) * slab), x_slab(in * slab);
    std::vector<int64_t> gy_off(end - begin), x_off(end - begin);  // row numbers, split once
    for (int64_t j = begin; j < end; ++j) {
      gy_off[j - begin] = static_cast<int64_t>(idx[j]) / in - row_begin;
      x_off[j - begin] = static_cast<int64_t>(idx[j]) % in;
    }
    for (int64_t n0 = 0; n0 < n; n0 += slab) {
      const int64_t len = std::min(slab, n - n0);
      transpose_slab(gy, p.out_features, row_begin, row_end, n0, len, gy_slab.data());
      transpose_slab(x, in, 0, in, n0, len, x_slab.data());
      for (int64_t j = 0; j < end - begin; ++j) {
        acc[j] += dot(gy_slab.data() + gy_off[j] * len, x_slab.data() + x_off[j] * len, len);
      }
    }
    for (int64_t j = begin; j < end; ++j) out[j] = static_cast<In>(acc[j - begin]);
  });
}

template <typename In>
void sampled_grad_dispatch(const SampledGradParams& p) {
  using T = acc_type<In>;
  p.indices_int32 ? sampled_grad_kernel<T, In, int32_t>(p) : sampled_grad_kernel<T, In, int64_t>(p);
}

void sampled_grad(const SampledGradParams& p) {
  switch (p.dtype) {
    case DType::Float64: return sampled_grad_dispatch<double>(p);
    case DType::Float32: return sampled_grad_dispatch<float>(p);
    case DType::BFloat16: return sampled_grad_dispatch<at::BFloat16>(p);
    case DType::Float16: return sampled_grad_dispatch<at::Half>(p);
  }
}

}  // namespace

constinit const SparseCpuKernels sparse_cpu_kernels{&sampled_grad};

}  // namespace pyfastpeft::CPU_CAPABILITY
