// CUDA glue of the multi-adapter LoRA family: tensors → params, device guard, current stream, registration.
// The frozen products go to cuBLAS through ATen; the per-adapter parts are our kernels, all launched
// on the current stream with no host synchronisation (indices and scalings stay on the device).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "pyfastpeft/cuda_glue.h"
#include "multi_lora.h"
#include "multi_lora_impl.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft {
namespace {

using multi_lora::acc_scalar_type;
using multi_lora::Shapes;

AdapterIndices indices_of(const at::Tensor& idx, int64_t num_adapters) {
  return {idx.const_data_ptr(), idx.scalar_type() == at::kInt, num_adapters};
}

const int64_t* rng_ptr(double dropout_p, const std::optional<at::Tensor>& rng_state) {
  return dropout_p > 0 ? rng_state->const_data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          const at::Tensor& scalings,
                                                          const at::Tensor& adapter_indices, double dropout_p,
                                                          const std::optional<at::Tensor>& rng_state) {
  const Shapes s = multi_lora::check_inputs(x, weight, bias, lora_A, lora_B, scalings, adapter_indices, dropout_p,
                                            rng_state);
  const c10::cuda::CUDAGuard guard(x.device());
  if (multi_lora::lora_term_is_empty(s)) return multi_lora::forward_base_only(x, weight, bias, s);
  const at::Tensor x2 = x.reshape({-1, s.in_features}).contiguous();
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const at::Tensor idx = adapter_indices.reshape({-1}).contiguous();
  const at::Tensor scale = scalings.to(at::kDouble).contiguous();
  at::Tensor y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor xa = at::empty({s.n_rows, s.rank}, x.options().dtype(acc_scalar_type(x.scalar_type())));
  const DType dtype = to_dtype(x.scalar_type());
  const MultiLoraShrinkParams shrink{x2.const_data_ptr(),
                                     A.const_data_ptr(),
                                     nullptr,
                                     indices_of(idx, s.num_adapters),
                                     xa.mutable_data_ptr(),
                                     s.n_rows,
                                     s.in_features,
                                     s.rank,
                                     s.rank * s.in_features,
                                     s.in_features,
                                     1,
                                     static_cast<float>(dropout_p),
                                     dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0,
                                     rng_ptr(dropout_p, rng_state),
                                     dtype};
  launch("multi_lora_shrink", [&] { multi_lora_shrink_cuda(shrink, current_stream()); });
  // y += s[a]·xa·B[a]ᵀ, in place on the frozen product.
  const MultiLoraExpandParams expand{xa.const_data_ptr(),
                                     B.const_data_ptr(),
                                     scale.const_data_ptr<double>(),
                                     indices_of(idx, s.num_adapters),
                                     y.mutable_data_ptr(),
                                     s.n_rows,
                                     s.out_features,
                                     s.rank,
                                     s.out_features * s.rank,
                                     s.rank,
                                     1,
                                     true,
                                     dtype};
  launch("multi_lora_expand", [&] { multi_lora_expand_cuda(expand, current_stream()); });
  return {y.view(multi_lora::with_last(x.sizes(), s.out_features)), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scalings, const at::Tensor& adapter_indices, const at::Tensor& xa,
    double dropout_p, const std::optional<at::Tensor>& rng_state, std::array<bool, 5> output_mask) {
  const Shapes s = multi_lora::check_inputs(x, weight, std::nullopt, lora_A, lora_B, scalings, adapter_indices,
                                            dropout_p, rng_state);
  multi_lora::check_backward_inputs(s, grad_y, x, xa);
  const c10::cuda::CUDAGuard guard(x.device());
  if (multi_lora::lora_term_is_empty(s)) {
    return multi_lora::backward_base_only(grad_y, x, weight, lora_A, lora_B, output_mask);
  }
  const auto [need_dx, need_dW, need_db, need_dA, need_dB] = output_mask;
  const at::Tensor x2 = x.reshape({-1, s.in_features}).contiguous();
  const at::Tensor g2 = grad_y.reshape({-1, s.out_features}).contiguous();
  // Outputs not asked for are distinct empty tensors (outputs must not alias one another).
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = none(), dW = none(), db = none(), dA = none(), dB = none();
  if (need_dW) dW = at::mm(g2.t(), x2);
  if (need_db) db = g2.sum(0);
  if (!need_dx && !need_dA && !need_dB) return {dx, dW, db, dA, dB};

  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), xac = xa.contiguous();
  const at::Tensor idx = adapter_indices.reshape({-1}).contiguous();
  const at::Tensor scale = scalings.to(at::kDouble).contiguous();
  const AdapterIndices indices = indices_of(idx, s.num_adapters);
  const DType dtype = to_dtype(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_scalar_type(x.scalar_type()));
  const int64_t* rng = rng_ptr(dropout_p, rng_state);
  const double dropout_scale = dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0;

  at::Tensor u;  // u = s[a]·dy·B[a]: the shrink kernel with B read transposed (contraction over out)
  if (need_dx || need_dA) {
    u = at::empty({s.n_rows, s.rank}, acc_options);
    const MultiLoraShrinkParams shrink{g2.const_data_ptr(),   B.const_data_ptr(), scale.const_data_ptr<double>(),
                                       indices,               u.mutable_data_ptr(), s.n_rows,
                                       s.out_features,        s.rank,             s.out_features * s.rank,
                                       1,                     s.rank,             0.0f,
                                       1.0,                   nullptr,            dtype};
    launch("multi_lora_shrink", [&] { multi_lora_shrink_cuda(shrink, current_stream()); });
  }
  if (need_dx) {
    // dx = drop'(u·A[a]) + dy·W: the LoRA part first, masked, then the frozen product accumulates into it.
    dx = at::empty({s.n_rows, s.in_features}, x.options());
    const MultiLoraExpandParams expand{u.const_data_ptr(), A.const_data_ptr(), nullptr,     indices,
                                       dx.mutable_data_ptr(), s.n_rows,        s.in_features, s.rank,
                                       s.rank * s.in_features, 1,              s.in_features, false,
                                       dtype};
    launch("multi_lora_expand", [&] { multi_lora_expand_cuda(expand, current_stream()); });
    if (dropout_p > 0) {
      const DropoutParams mask{dx.const_data_ptr(), dx.mutable_data_ptr(), nullptr, nullptr, dx.numel(),
                               static_cast<float>(dropout_p), dropout_scale, rng, dtype};
      launch("dropout", [&] { dropout_apply_cuda(mask, current_stream()); });
    }
    dx.addmm_(g2, weight);
    dx = dx.view(x.sizes());
  }
  if (need_dA || need_dB) {
    TORCH_CHECK_VALUE(s.num_adapters <= kMaxGroupAdapters, "lora_A: at most ", kMaxGroupAdapters,
                      " adapters are supported on CUDA, got ", s.num_adapters);
    at::Tensor sorted = at::empty({s.n_rows}, x.options().dtype(at::kLong));
    at::Tensor offsets = at::empty({s.num_adapters + 1}, x.options().dtype(at::kLong));
    const MultiLoraGroupParams group{indices, s.n_rows, sorted.mutable_data_ptr<int64_t>(),
                                     offsets.mutable_data_ptr<int64_t>()};
    launch("multi_lora_group", [&] { multi_lora_group_cuda(group, current_stream()); });
    if (need_dA) {  // dA[k] = Σ u[n]ᵀ·drop(x)[n]
      dA = at::empty({s.num_adapters, s.rank, s.in_features}, x.options());
      const MultiLoraWeightGradParams grad{u.const_data_ptr(),     x2.const_data_ptr(),     true,
                                           false,                  nullptr,                 sorted.const_data_ptr<int64_t>(),
                                           offsets.const_data_ptr<int64_t>(), dA.mutable_data_ptr(), s.num_adapters,
                                           s.rank,                 s.in_features,           static_cast<float>(dropout_p),
                                           dropout_scale,          rng,                     dtype};
      launch("multi_lora_weight_grad", [&] { multi_lora_weight_grad_cuda(grad, current_stream()); });
    }
    if (need_dB) {  // dB[k] = s[k]·Σ dy[n]ᵀ·xa[n]
      dB = at::empty({s.num_adapters, s.out_features, s.rank}, x.options());
      const MultiLoraWeightGradParams grad{g2.const_data_ptr(),    xac.const_data_ptr(),    false,
                                           true,                   scale.const_data_ptr<double>(),
                                           sorted.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                           dB.mutable_data_ptr(),  s.num_adapters,          s.out_features,
                                           s.rank,                 0.0f,                    1.0,
                                           nullptr,                dtype};
      launch("multi_lora_weight_grad", [&] { multi_lora_weight_grad_cuda(grad, current_stream()); });
    }
  }
  return {dx, dW, db, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_cuda);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cuda);
}

}  // namespace pyfastpeft
