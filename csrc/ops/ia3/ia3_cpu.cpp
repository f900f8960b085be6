// CPU glue of the ia3 family (ia3.h) and its registration; the backward pass runs in ia3_kernels_cpu.cpp,
// compiled once per CPU capability level.
//
// forward:  y = x ⊙ l (l broadcast over the rows)               one ATen multiply (vectorized, threaded)
// backward: dx = dy ⊙ l, dl[j] = Σ_n dy[n, j]·x[n, j]           one fused pass over dy and x
// The backward walks fixed slabs of rows in parallel (slab_reduce_cpu.h): each slab writes its rows of dx
// and adds its products into its own accumulation row; the rows are then added in slab order, so dl does
// not depend on the number of threads, and 16-bit inputs accumulate in float.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "ia3_impl.h"
#include "ia3_kernels_cpu.h"

namespace pyfastpeft {
namespace {

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
  ia3_cpu_kernels().scale_backward({dy2.const_data_ptr(), x2.const_data_ptr(), l.const_data_ptr(),
                                    need_dx ? dx.mutable_data_ptr() : nullptr, need_dl ? dl.mutable_data_ptr() : nullptr,
                                    n_rows, cols, dy2.stride(0), x2.stride(0), to_dtype(dy2.scalar_type())});
  if (need_dx) dx = dx.view(grad_y.sizes());
  return {dx, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("ia3_scale", &ia3_scale_cpu);
  m.impl("ia3_scale_backward", &ia3_scale_backward_cpu);
}

}  // namespace pyfastpeft
