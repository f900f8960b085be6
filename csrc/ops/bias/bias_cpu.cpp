// CPU glue of the bias family (BitFit linear) and its registration; the column sums of db run in
// bias_kernels_cpu.cpp, compiled once per CPU capability level.
//
// forward:  y = x·Wᵀ + b                           (one addmm; nothing of x is kept for the backward)
// backward: dx = dy·W, db[o] = Σ_n dy[n, o]        (bias.h)
// dx is one multithreaded ATen GEMM. db sums dy in fixed slabs of kRows rows (slab_reduce_cpu.h), so
// db does not depend on the number of threads. Fusing the two (each thread running the GEMM of its
// rows, then summing the same cache-warm rows) was measured 2-7 % slower at N = 2048, in = out = 1024
// on 2 threads than one GEMM plus this column sum, which costs ~3 % of the GEMM (bench/bench_bias.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "bias_impl.h"
#include "bias_kernels_cpu.h"

namespace pyfastpeft {
namespace {

at::Tensor bias_only_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  bias::check_forward(x, weight, bias);
  const at::Tensor x2 = as_rows(x);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return at::addmm(bias, x2, weight.t()).view(shape);
}

std::tuple<at::Tensor, at::Tensor> bias_only_linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& weight,
                                                                 std::array<bool, 2> output_mask) {
  bias::check_backward(grad_y, weight);
  const auto [need_dx, need_db] = output_mask;
  const at::Tensor dy2 = bias::rows_view(grad_y);
  const int64_t n_rows = dy2.size(0), out = dy2.size(1), in = weight.size(1);
  at::Tensor dx = need_dx ? at::empty({n_rows, in}, dy2.options()) : at::empty({0}, dy2.options());
  at::Tensor db = need_db ? at::empty({out}, dy2.options()) : at::empty({0}, dy2.options());
  if (need_dx) at::mm_out(dx, dy2, weight);
  if (need_db) {
    bias_cpu_kernels().column_sums({dy2.const_data_ptr(), n_rows, out, dy2.stride(0), db.mutable_data_ptr(),
                                    to_dtype(dy2.scalar_type())});
  }
  if (need_dx) dx = dx.view(bias::dx_shape(grad_y, weight));
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("bias_only_linear", &bias_only_linear_cpu);
  m.impl("bias_only_linear_backward", &bias_only_linear_backward_cpu);
}

}  // namespace pyfastpeft
