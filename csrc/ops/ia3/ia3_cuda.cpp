// CUDA glue of the ia3 family: tensors → params, device guard, current stream, registration.
// The forward is ATen's multiply; the backward is the fused kernel of ia3_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "ia3.h"
#include "ia3_impl.h"
#include "pyfastpeft/cuda_glue.h"

namespace pyfastpeft {
namespace {

at::Tensor ia3_scale_cuda(const at::Tensor& x, const at::Tensor& scale) {
  ia3::check_forward(x, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::mul(x, scale);
}

std::tuple<at::Tensor, at::Tensor> ia3_scale_backward_cuda_op(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& scale, std::array<bool, 2> output_mask) {
  ia3::check_backward(grad_y, x, scale);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto [need_dx, need_dl] = output_mask;
  const at::Tensor dy2 = ia3::rows_view(grad_y);
  const at::Tensor x2 = need_dl ? ia3::rows_view(x) : dy2;
  const at::Tensor l = scale.contiguous();
  const int64_t n_rows = dy2.size(0), cols = dy2.size(1);
  const int64_t rows_per_chunk = ia3_rows_per_chunk(n_rows);
  const int64_t n_chunks = std::max<int64_t>(1, (n_rows + rows_per_chunk - 1) / rows_per_chunk);
  at::Tensor dx = need_dx ? at::empty({n_rows, cols}, dy2.options()) : at::empty({0}, dy2.options());
  at::Tensor dl = need_dl ? at::empty({cols}, dy2.options()) : at::empty({0}, dy2.options());
  const auto acc = dy2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = need_dl ? at::empty({n_chunks, cols}, dy2.options().dtype(acc)) : at::empty({0}, dy2.options());
  const Ia3ScaleBackwardParams params{dy2.const_data_ptr(),
                                      x2.const_data_ptr(),
                                      l.const_data_ptr(),
                                      need_dx ? dx.mutable_data_ptr() : nullptr,
                                      need_dl ? partial.mutable_data_ptr() : nullptr,
                                      need_dl ? dl.mutable_data_ptr() : nullptr,
                                      n_rows,
                                      cols,
                                      dy2.stride(0),
                                      x2.stride(0),
                                      rows_per_chunk,
                                      n_chunks,
                                      need_dx,
                                      need_dl,
                                      to_dtype(dy2.scalar_type())};
  launch("ia3_scale_backward", [&] { ia3_scale_backward_cuda(params, current_stream()); });
  if (need_dx) dx = dx.view(grad_y.sizes());
  return {dx, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("ia3_scale", &ia3_scale_cuda);
  m.impl("ia3_scale_backward", &ia3_scale_backward_cuda_op);
}

}  // namespace pyfastpeft
