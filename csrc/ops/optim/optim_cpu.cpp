// CPU glue of the optim family: the ops' list checks and registration. The kernels
// (optim_kernels_cpu.cpp, compiled once per CPU capability level) run through optim_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "optim.h"
#include "optim_impl.h"
#include "optim_kernels_cpu.h"

namespace pyfastpeft {
namespace {

void fused_adamw_cpu_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                        at::TensorList anchors, at::TensorList steps, const at::Tensor& lr,
                        const std::optional<at::Tensor>& grad_scale, double beta1, double beta2, double eps,
                        double weight_decay, double l2sp, bool maximize) {
  const optim::AdamWLists lists =
      optim::adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, anchors, steps, lr,
                         grad_scale, beta1, beta2, eps, weight_decay, l2sp, maximize);
  if (lists.params.n_tensors > 0) fused_adamw_cpu(lists.params);
}

at::Tensor multi_tensor_l2_norm_cpu_op(at::TensorList tensors) {
  std::vector<at::Tensor> keep;
  optim::L2NormLists lists = optim::l2_norm_lists(tensors, keep);
  at::Tensor out = at::empty({}, tensors[0].options().dtype(at::kFloat));
  lists.params.out = out.data_ptr<float>();
  multi_tensor_l2_norm_cpu(lists.params);
  return out;
}

}  // namespace

void fused_adamw_cpu(const AdamWParams& p) { optim_cpu_kernels().adamw(p); }

void multi_tensor_l2_norm_cpu(const L2NormParams& p) { optim_cpu_kernels().l2_norm(p); }

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("fused_adamw_", &fused_adamw_cpu_op);
  m.impl("multi_tensor_l2_norm", &multi_tensor_l2_norm_cpu_op);
}

}  // namespace pyfastpeft
