// CUDA glue of the quant family: tensors → params, device guard, current stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>

#include "pyfastpeft/cuda_glue.h"
#include "quant.h"
#include "quant_impl.h"

namespace pyfastpeft {
namespace {

at::ScalarType acc_scalar_type(DType dtype) { return dtype == DType::Float64 ? at::kDouble : at::kFloat; }

struct CudaBackend {
  static void fake_quantize(const FakeQuantParams& p) {
    const int64_t n = fake_quantize_cuda_workspace_elements(p.layout);
    at::Tensor workspace;
    if (n > 0) {
      workspace = at::empty({n}, at::TensorOptions().dtype(acc_scalar_type(p.dtype)).device(at::kCUDA,
                                                                                               c10::cuda::current_device()));
    }
    launch("fake_quantize", [&] { fake_quantize_cuda(p, n > 0 ? workspace.mutable_data_ptr() : nullptr, current_stream()); });
  }
  static void apply(const FakeQuantApplyParams& p) {
    launch("fake_quantize_lsq", [&] { fake_quantize_apply_cuda(p, current_stream()); });
  }
  static void backward(const FakeQuantBackwardParams& p) {
    launch("fake_quantize_backward", [&] { fake_quantize_backward_cuda(p, current_stream()); });
  }
  static std::tuple<at::Tensor, at::Tensor> lsq_backward(LsqBackwardParams& p, const at::Tensor& scale, bool has_zp) {
    const int64_t splits = lsq_backward_cuda_splits(p.layout), C = p.layout.channels;
    at::Tensor partial_s = at::empty({splits, C}, scale.options());
    at::Tensor partial_z = at::empty({has_zp ? splits : 0, C}, scale.options());
    p.grad_scale = partial_s.mutable_data_ptr();
    p.grad_zero_point = has_zp ? partial_z.mutable_data_ptr() : nullptr;
    launch("fake_quantize_lsq_backward", [&] { lsq_backward_cuda(p, splits, current_stream()); });
    at::Tensor dz = has_zp ? at::sum(partial_z, 0) : at::empty({0}, scale.options());
    return {at::sum(partial_s, 0), dz};
  }
};

template <class F>
auto guarded(const at::Tensor& x, F&& f) {
  const c10::cuda::CUDAGuard guard(x.device());
  return f();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_cuda_op(const at::Tensor& x, int64_t bits,
                                                                     int64_t group_size, bool symmetric, int64_t axis) {
  return guarded(x, [&] { return quant::fake_quantize<CudaBackend>(x, bits, group_size, symmetric, axis); });
}

at::Tensor fake_quantize_backward_cuda_op(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                                          const at::Tensor& zero_point, int64_t bits, int64_t group_size,
                                          int64_t axis) {
  return guarded(x, [&] {
    return quant::fake_quantize_backward<CudaBackend>(grad_out, x, scale, zero_point, bits, group_size, axis);
  });
}

at::Tensor fake_quantize_lsq_cuda_op(const at::Tensor& x, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                                     int64_t axis, double grad_factor) {
  return guarded(x, [&] {
    return quant::fake_quantize_lsq<CudaBackend>(x, scale, zero_point, bits, group_size, axis, grad_factor);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_lsq_backward_cuda_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size, int64_t axis, double grad_factor,
    bool need_grad_x) {
  return guarded(x, [&] {
    return quant::fake_quantize_lsq_backward<CudaBackend>(grad_out, x, scale, zero_point, bits, group_size, axis,
                                                          grad_factor, need_grad_x);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("fake_quantize", &fake_quantize_cuda_op);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda_op);
  m.impl("fake_quantize_lsq", &fake_quantize_lsq_cuda_op);
  m.impl("fake_quantize_lsq_backward", &fake_quantize_lsq_backward_cuda_op);
}

}  // namespace pyfastpeft
