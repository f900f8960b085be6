// CUDA glue of the bias family: tensors → params, device guard, current stream, registration.
// dx = dy·W goes to ATen (cuBLAS); db = Σ_n dy[n, :] is the column-sum kernel of bias_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <stdexcept>
#include <tuple>

#include "bias.h"
#include "bias_impl.h"

namespace pyfastpeft {
namespace {

at::Tensor bias_only_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  bias::check_forward(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = as_rows(x);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return at::addmm(bias, x2, weight.t()).view(shape);
}

std::tuple<at::Tensor, at::Tensor> bias_only_linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& weight,
                                                                  std::array<bool, 2> output_mask) {
  bias::check_backward(grad_y, weight);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor dy2 = bias::rows_view(grad_y);
  at::Tensor dx = at::empty({0}, dy2.options());
  at::Tensor db = at::empty({0}, dy2.options());
  if (output_mask[0]) dx = at::mm(dy2, weight).view(bias::dx_shape(grad_y, weight));
  if (output_mask[1]) {
    db = at::empty({dy2.size(1)}, dy2.options());
    const ColumnSumParams params{dy2.const_data_ptr(), db.mutable_data_ptr(), dy2.size(0), dy2.size(1),
                                 dy2.stride(0), to_dtype(dy2.scalar_type())};
    try {
      column_sum_cuda(params, c10::cuda::getCurrentCUDAStream().stream());
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, "bias_only_linear_backward: ", e.what());
    }
  }
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("bias_only_linear", &bias_only_linear_cuda);
  m.impl("bias_only_linear_backward", &bias_only_linear_backward_cuda);
}

}  // namespace pyfastpeft
