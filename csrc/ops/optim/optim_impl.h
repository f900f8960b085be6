// Tensor lists → AdamWParams / L2NormParams, with every argument checked once; shared by the CPU and
// CUDA registrations. The pointer arrays live in AdamWLists, which must outlive the launch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "optim.h"
#include "pyfastpeft/checks.h"

namespace pyfastpeft::optim {

struct AdamWLists {
  std::vector<void*> param, exp_avg, exp_avg_sq, max_exp_avg_sq, master;
  std::vector<const void*> grad, anchor;
  std::vector<float*> step;
  std::vector<int64_t> numel;
  AdamWParams params{};
};

inline std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// An optional list is either empty or one tensor per parameter, of `dtype`, shaped like the parameter.
inline void check_list(at::TensorList list, const char* name, at::TensorList params, at::ScalarType dtype,
                       bool optional) {
  if (optional && list.empty()) return;
  TORCH_CHECK_VALUE(list.size() == params.size(), name, ": expected ", params.size(),
                    " tensors (one per parameter), got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string n = item(name, i);
    TORCH_CHECK_VALUE(list[i].device() == params[0].device(), n, ": expected device ", params[0].device(), ", got ",
                      list[i].device());
    TORCH_CHECK_VALUE(list[i].scalar_type() == dtype, n, ": expected dtype ", dtype, ", got ", list[i].scalar_type());
    TORCH_CHECK_VALUE(list[i].sizes() == params[i].sizes(), n, ": expected shape ", params[i].sizes(),
                      " (the shape of params[", i, "]), got ", list[i].sizes());
    TORCH_CHECK_VALUE(list[i].is_contiguous(), n, ": expected a contiguous tensor");
  }
}

inline void check_scalar(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == dtype, name, ": expected a one-element ", dtype,
                    " tensor, got dtype ", t.scalar_type(), " and shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(),
                    " (the parameters' device), got ", t.device());
}

inline AdamWLists adamw_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                              at::TensorList anchors, at::TensorList steps, const at::Tensor& lr,
                              const std::optional<at::Tensor>& grad_scale, double beta1, double beta2, double eps,
                              double weight_decay, double l2sp, bool maximize) {
  AdamWLists out;
  const size_t n = params.size();
  out.params.n_tensors = static_cast<int64_t>(n);
  if (n == 0) return out;
  const at::ScalarType pdtype = params[0].scalar_type();
  check_float(params[0], "params[0]");
  const bool use_master = !masters.empty();
  const at::ScalarType sdtype = use_master ? at::kFloat : pdtype;
  TORCH_CHECK_VALUE(!use_master || pdtype == at::kBFloat16 || pdtype == at::kHalf,
                    "masters: float32 master weights are for bfloat16 or float16 parameters, got ", pdtype);
  check_list(params, "params", params, pdtype, false);
  check_list(grads, "grads", params, pdtype, false);
  check_list(exp_avgs, "exp_avgs", params, sdtype, false);
  check_list(exp_avg_sqs, "exp_avg_sqs", params, sdtype, false);
  check_list(max_exp_avg_sqs, "max_exp_avg_sqs", params, sdtype, true);
  check_list(masters, "masters", params, at::kFloat, true);
  check_list(anchors, "anchors", params, sdtype, true);
  TORCH_CHECK_VALUE(l2sp == 0 || !anchors.empty(), "anchors: required when l2sp != 0");
  TORCH_CHECK_VALUE(steps.size() == n, "steps: expected ", n, " tensors (one per parameter), got ", steps.size());
  for (size_t i = 0; i < n; ++i) check_scalar(steps[i], item("steps", i).c_str(), at::kFloat, params[0]);
  check_scalar(lr, "lr", at::kDouble, params[0]);
  if (grad_scale) check_scalar(*grad_scale, "grad_scale", at::kFloat, params[0]);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1: expected a value in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2: expected a value in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected a non-negative value, got ", eps);

  for (size_t i = 0; i < n; ++i) {
    out.param.push_back(params[i].data_ptr());
    out.grad.push_back(grads[i].const_data_ptr());
    out.exp_avg.push_back(exp_avgs[i].data_ptr());
    out.exp_avg_sq.push_back(exp_avg_sqs[i].data_ptr());
    if (!max_exp_avg_sqs.empty()) out.max_exp_avg_sq.push_back(max_exp_avg_sqs[i].data_ptr());
    if (use_master) out.master.push_back(masters[i].data_ptr());
    if (!anchors.empty()) out.anchor.push_back(anchors[i].const_data_ptr());
    out.step.push_back(steps[i].data_ptr<float>());
    out.numel.push_back(params[i].numel());
  }
  AdamWParams& p = out.params;
  p.param = out.param.data();
  p.grad = out.grad.data();
  p.exp_avg = out.exp_avg.data();
  p.exp_avg_sq = out.exp_avg_sq.data();
  p.max_exp_avg_sq = out.max_exp_avg_sq.empty() ? nullptr : out.max_exp_avg_sq.data();
  p.master = use_master ? out.master.data() : nullptr;
  p.anchor = (l2sp != 0 && !anchors.empty()) ? out.anchor.data() : nullptr;
  p.step = out.step.data();
  p.numel = out.numel.data();
  p.lr = lr.const_data_ptr<double>();
  p.grad_scale = grad_scale ? grad_scale->const_data_ptr<float>() : nullptr;
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.eps = eps;
  p.weight_decay = weight_decay;
  p.l2sp = l2sp;
  p.maximize = maximize;
  p.param_dtype = to_dtype(pdtype);
  p.state_dtype = to_dtype(sdtype);
  return out;
}

struct L2NormLists {
  std::vector<const void*> data;
  std::vector<int64_t> numel;
  L2NormParams params{};
};

// The list is non-empty, of one float dtype and one device; non-contiguous tensors are made contiguous
// (kept alive in `keep`).
inline L2NormLists l2_norm_lists(at::TensorList tensors, std::vector<at::Tensor>& keep) {
  TORCH_CHECK_VALUE(!tensors.empty(), "tensors: expected at least one tensor");
  check_float(tensors[0], "tensors[0]");
  L2NormLists out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string n = item("tensors", i);
    TORCH_CHECK_VALUE(tensors[i].scalar_type() == tensors[0].scalar_type(), n, ": expected dtype ",
                      tensors[0].scalar_type(), " (the dtype of tensors[0]), got ", tensors[i].scalar_type());
    TORCH_CHECK_VALUE(tensors[i].device() == tensors[0].device(), n, ": expected device ", tensors[0].device(),
                      " (the device of tensors[0]), got ", tensors[i].device());
    keep.push_back(tensors[i].contiguous());
    out.data.push_back(keep.back().const_data_ptr());
    out.numel.push_back(keep.back().numel());
  }
  out.params.n_tensors = static_cast<int64_t>(tensors.size());
  out.params.data = out.data.data();
  out.params.numel = out.numel.data();
  out.params.dtype = to_dtype(tensors[0].scalar_type());
  return out;
}

}  // namespace pyfastpeft::optim
