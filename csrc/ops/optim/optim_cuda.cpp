// CUDA glue of the optim family: tensor lists → params, device guard, current stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>
#include <vector>

#include "pyfastpeft/cuda_glue.h"
#include "optim.h"
#include "optim_impl.h"

namespace pyfastpeft {
namespace {

void fused_adamw_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                         at::TensorList anchors, at::TensorList steps, const at::Tensor& lr,
                         const std::optional<at::Tensor>& grad_scale, double beta1, double beta2, double eps,
                         double weight_decay, double l2sp, bool maximize) {
  const optim::AdamWLists lists =
      optim::adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, anchors, steps, lr,
                         grad_scale, beta1, beta2, eps, weight_decay, l2sp, maximize);
  if (lists.params.n_tensors == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch("fused_adamw_", [&] { fused_adamw_cuda(lists.params, current_stream()); });
}

at::Tensor multi_tensor_l2_norm_cuda_op(at::TensorList tensors) {
  std::vector<at::Tensor> keep;
  optim::L2NormLists lists = optim::l2_norm_lists(tensors, keep);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto options = tensors[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({}, options);
  at::Tensor workspace = at::empty({multi_tensor_l2_norm_workspace(lists.params)}, options);
  lists.params.out = out.data_ptr<float>();
  launch("multi_tensor_l2_norm",
         [&] { multi_tensor_l2_norm_cuda(lists.params, workspace.data_ptr<float>(), current_stream()); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_cuda_op);
  m.impl("multi_tensor_l2_norm", &multi_tensor_l2_norm_cuda_op);
}

}  // namespace pyfastpeft
