// CUDA glue of the sparse family: tensors → params, device guard, current stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>

#include "pyfastpeft/checks.h"
#include "pyfastpeft/cuda_glue.h"
#include "sparse.h"
#include "sparse_impl.h"

namespace pyfastpeft {
namespace {

struct CudaBackend {
  // Range and strict order are reduced on the device to one flag. Eagerly, the flag is read back (one
  // host sync) and a failure copies the indices to the host to name the offending entry in a
  // ValueError. While the stream is being captured into a CUDA graph no host read is allowed, so the
  // flag feeds a device-side assert instead: a bad index then fails the replay with "device-side
  // assert triggered" rather than a ValueError. The sampled-gradient kernel does not rely on either:
  // it writes NaN for an out-of-range index instead of reading out of bounds.
  static void check_indices(const at::Tensor& indices, int64_t numel) {
    const int64_t k = indices.numel();
    if (k == 0) return;
    at::Tensor ok = indices.min().ge(0).logical_and(indices.max().lt(numel));
    if (k > 1) ok = ok.logical_and(indices.slice(0, 1).gt(indices.slice(0, 0, k - 1)).all());
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
      at::_assert_async(ok, "indices: expected strictly increasing flat indices within the weight");
      return;
    }
    if (!ok.item<bool>()) sparse::check_indices_host(indices.cpu(), numel);
  }

  static at::Tensor sampled_grad(const at::Tensor& gy2, const at::Tensor& x2, const at::Tensor& indices,
                                 int64_t in_features) {
    const c10::cuda::CUDAGuard guard(x2.device());
    const at::Tensor gy_t = gy2.t().contiguous();
    const at::Tensor x_t = x2.t().contiguous();
    const at::Tensor idx = indices.contiguous();
    at::Tensor out = at::empty({idx.numel()}, x2.options());
    // the kernel reads feature-major copies (sparse.h)
    const SampledGradParams params{gy_t.const_data_ptr(), x_t.const_data_ptr(), idx.const_data_ptr(),
                                   idx.scalar_type() == at::kInt, out.mutable_data_ptr(), x2.size(0),
                                   in_features, gy2.size(1), idx.numel(), to_dtype(x2.scalar_type())};
    launch("sampled_weight_grad", [&] { sampled_weight_grad_cuda(params, current_stream()); });
    return out;
  }
};

at::Tensor sampled_weight_grad_cuda_op(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& indices,
                                       int64_t in_features) {
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse::sampled_weight_grad<CudaBackend>(grad_y, x, indices, in_features);
}

at::Tensor sparse_delta_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& delta,
                                    const at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse::forward<CudaBackend>(x, weight, bias, delta, indices);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
    const at::Tensor& indices, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse::backward<CudaBackend>(grad_y, x, weight, delta, indices, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("sampled_weight_grad", &sampled_weight_grad_cuda_op);
  m.impl("sparse_delta_linear", &sparse_delta_linear_cuda);
  m.impl("sparse_delta_linear_backward", &sparse_delta_linear_backward_cuda);
}

}  // namespace pyfastpeft
