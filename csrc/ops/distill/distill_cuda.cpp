// CUDA glue of the distillation family: device guard, current stream, launch check, registration.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>

#include "pyfastpeft/cuda_glue.h"
#include "distill.h"
#include "distill_impl.h"

namespace pyfastpeft {
namespace {

struct CudaBackend {
  static void rows(const KdLossParams& params) {
    launch("kd_loss", [&] { kd_loss_rows_cuda(params, current_stream()); });
  }
  // One device-to-host read per call: the price of reporting a bad label as a ValueError.
  static bool any_bad_label(const at::Tensor& bad_label) { return bad_label.item<int32_t>() != 0; }
};

std::tuple<at::Tensor, at::Tensor> kd_loss_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                                const std::optional<at::Tensor>& labels, double temperature,
                                                double alpha, int64_t ignore_index, c10::string_view divergence,
                                                bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  return distill::kd_loss<CudaBackend>(student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
                                       divergence, compute_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_loss_cuda(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& labels, double temperature, double alpha,
    int64_t ignore_index, c10::string_view divergence, int64_t chunk_size, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  return distill::fused_linear_kd_loss<CudaBackend>(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                    labels, temperature, alpha, ignore_index, divergence, chunk_size,
                                                    output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_cuda(const at::Tensor& hidden,
                                                                               const at::Tensor& weight,
                                                                               const at::Tensor& labels,
                                                                               int64_t ignore_index,
                                                                               int64_t chunk_size,
                                                                               std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return distill::fused_linear_cross_entropy<CudaBackend>(hidden, weight, labels, ignore_index, chunk_size,
                                                          output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("kd_loss", &kd_loss_cuda);
  m.impl("fused_linear_kd_loss", &fused_linear_kd_loss_cuda);
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cuda);
}

}  // namespace pyfastpeft
