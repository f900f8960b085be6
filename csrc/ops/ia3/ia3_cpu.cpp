// CPU kernels of the ia3 family (ia3.h) and their registration.
//
// forward:  y = x ⊙ l (l broadcast over the rows)               one ATen multiply (vectorized, threaded)
// backward: dx = dy ⊙ l, dl[j] = Σ_n dy[n, j]·x[n, j]           one fused pass over dy and x
// The backward walks fixed slabs of rows in parallel (slab_reduce_cpu.h): each slab writes its rows of dx
// and adds its products into its own accumulation row; the rows are then added in slab order, so dl does
// not depend on the number of threads, and 16-bit inputs accumulate in float.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "ia3_impl.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/slab_reduce_cpu.h"

namespace pyfastpeft {
namespace {

// Rows per slab: at least 64, and at most 256 slabs (bounding the accumulation rows); depends only on the
// number of rows, which fixes the summation order of dl.
int64_t rows_per_slab(int64_t n_rows) { return std::max<int64_t>(64, (n_rows + 255) / 256); }

// Rows [0, rows) of one slab: dx = dy ⊙ l and acc += dy ⊙ x; the loop over j vectorizes.
template <typename T, typename A>
void scale_backward_rows(const T* dy, const T* x, const T* l, T* dx, A* acc, int64_t rows, int64_t cols,
                         int64_t dy_stride, int64_t x_stride, bool need_dx, bool need_dl) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* g = dy + n * dy_stride;
    if (need_dx) {
      T* out = dx + n * cols;
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<T>(static_cast<A>(g[j]) * static_cast<A>(l[j]));
    }
    if (need_dl) {
      const T* xr = x + n * x_stride;
      for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<A>(g[j]) * static_cast<A>(xr[j]);
    }
  }
}

at::Tensor ia3_scale_cpu(const at::Tensor& x, const at::Tensor& scale) {
  ia3::check_forward(x, scale);
  return at::mul(x, scale);
}

std::tuple<at::Tensor, at::Tensor> ia3_scale_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& scale, std::array<bool, 2> output_mask) {
  ia3::check_backward(grad_y, x, scale);
  const auto [need_dx, need_dl] = output_mask;
  const at::Tensor dy2 = ia3::rows_view(grad_y);
  const at::Tensor x2 = need_dl ? ia3::rows_view(x) : dy2;
  const at::Tensor l = scale.contiguous();
  const int64_t n_rows = dy2.size(0), cols = dy2.size(1);
  at::Tensor dx = need_dx ? at::empty({n_rows, cols}, dy2.options()) : at::empty({0}, dy2.options());
  at::Tensor dl = need_dl ? at::empty({cols}, dy2.options()) : at::empty({0}, dy2.options());
  if (!need_dx && !need_dl) return {dx, dl};
  const int64_t slab = rows_per_slab(n_rows);
  PFP_DISPATCH_FLOATING(dy2.scalar_type(), "ia3_scale_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* dy_ptr = dy2.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x2.const_data_ptr<scalar_t>();
    const scalar_t* l_ptr = l.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t dy_stride = dy2.stride(0), x_stride = x2.stride(0);
    const auto rows_of = [&](int64_t r0, int64_t rows, acc_t* acc) {
      scale_backward_rows(dy_ptr + r0 * dy_stride, x_ptr + r0 * x_stride, l_ptr, need_dx ? dx_ptr + r0 * cols : nullptr,
                          acc, rows, cols, dy_stride, x_stride, need_dx, need_dl);
    };
    if (need_dl) {
      cpu::slab_column_sums<acc_t>(n_rows, cols, slab, rows_of, dl.mutable_data_ptr<scalar_t>());
    } else {
      cpu::for_each_slab(n_rows, slab, [&](int64_t, int64_t r0, int64_t rows) { rows_of(r0, rows, nullptr); });
    }
  });
  if (need_dx) dx = dx.view(grad_y.sizes());
  return {dx, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("ia3_scale", &ia3_scale_cpu);
  m.impl("ia3_scale_backward", &ia3_scale_backward_cpu);
}

}  // namespace pyfastpeft
