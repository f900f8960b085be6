// The LoRA linear's composition, shared by the CPU and CUDA registrations: the large frozen products go
// to the BLAS through ATen (MKL / cuBLAS) and accumulate into the rank-r half's result in place; the
// rank-r half, with its Philox dropout, is the backend's. `Backend` supplies:
//   // (xa = drop(x)·Aᵀ, keep: the mask as bits or an empty uint8 tensor), and y [N, out] (allocated,
//   // contiguous) written as bias + s·xa·Bᵀ
//   static std::pair<at::Tensor, at::Tensor> forward_rank(x2, A, B, bias, scaling, p, rng, at::Tensor& y);
//   // (dx_lora = drop'(u·A) or undefined, dA, dB) with u = s·dy·B; each only when asked for; keep: the
//   // forward's bits, or nullptr to draw the mask again
//   static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_rank(g2, x2, A, B, xa, scaling, p, rng,
//                                                                       keep, need_dx, need_dA, need_dB);
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "lora.h"
#include "pyfastpeft/checks.h"
#include "pyfastpeft/philox.h"

namespace pyfastpeft::lora {

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, double dropout_p,
                         const std::optional<at::Tensor>& rng_state) {
  check_min_dim(x, "x", 1);
  check_float(x, "x");
  check_dim(weight, "weight", 2);
  check_dim(lora_A, "lora_A", 2);
  check_dim(lora_B, "lora_B", 2);
  const int64_t out_features = weight.size(0), in_features = weight.size(1), rank = lora_A.size(0);
  check_size(x, "x", x.dim() - 1, in_features, "in_features, from weight [out, in]");
  check_size(lora_A, "lora_A", 1, in_features, "in_features, from weight [out, in]");
  check_size(lora_B, "lora_B", 0, out_features, "out_features, from weight [out, in]");
  check_size(lora_B, "lora_B", 1, rank, "the rank r, from lora_A [r, in]");
  TORCH_CHECK_VALUE(rank >= 1, "lora_A: expected rank r >= 1, got shape ", lora_A.sizes());
  check_like({{&weight, "weight"}, {&lora_A, "lora_A"}, {&lora_B, "lora_B"}}, x, "x");
  check_bias(bias, out_features, x);
  check_dropout_p(dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK_VALUE(rng_state.has_value(), "rng_state: required when dropout_p > 0");
    check_rng_state(*rng_state, x, "x");
  }
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scaling, double dropout_p,
                                           const std::optional<at::Tensor>& rng_state) {
  check_inputs(x, weight, bias, lora_A, lora_B, dropout_p, rng_state);
  const int64_t out_features = weight.size(0);
  const at::Tensor x2 = as_rows(x);
  // y = b + s·xa·Bᵀ (rank-r, cheap) first, then the frozen product accumulates into it (beta = 1).
  at::Tensor y = at::empty({x2.size(0), out_features}, x.options());
  const auto [xa, keep] = Backend::forward_rank(x2, lora_A, lora_B, bias, scaling, dropout_p,
                                                dropout_p > 0 ? rng_state->const_data_ptr<int64_t>() : nullptr, y);
  y.addmm_(x2, weight.t());
  return {y.view(with_last(x.sizes(), out_features)), xa, keep};
}

// output_mask: which of (dx, dW, db, dA, dB) to compute; the others come back as empty tensors.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& keep,
    std::array<bool, 5> output_mask) {
  check_inputs(x, weight, std::nullopt, lora_A, lora_B, dropout_p, rng_state);
  const int64_t out_features = weight.size(0), rank = lora_A.size(0);
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(with_last(x.sizes(), out_features)),
                    "grad_y: expected shape ", with_last(x.sizes(), out_features), ", got ", grad_y.sizes());
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_devices({{&grad_y, "grad_y"}, {&xa, "xa"}}, x, "x");
  const at::Tensor x2 = as_rows(x);
  const int64_t n_rows = x2.size(0);
  check_dim(xa, "xa", 2);
  check_size(xa, "xa", 0, n_rows, "tokens");
  check_size(xa, "xa", 1, rank, "rank");
  const at::Tensor g2 = as_rows(grad_y);
  // the forward's mask as bits (the CPU forward's third output); absent or empty: drawn again
  const uint8_t* keep_bits = nullptr;
  if (dropout_p > 0 && keep && keep->numel() > 0) {
    TORCH_CHECK_VALUE(keep->scalar_type() == at::kByte, "keep: expected dtype Byte (uint8), got ",
                      keep->scalar_type());
    check_same_devices({{&*keep, "keep"}}, x, "x");
    const int64_t need = dropout_keep_bytes(n_rows * x2.size(1));
    TORCH_CHECK_VALUE(keep->dim() == 1 && keep->numel() == need && keep->is_contiguous(),
                      "keep: expected the forward's mask bits, a contiguous [", need, "] tensor, got shape ",
                      keep->sizes());
    keep_bits = keep->const_data_ptr<uint8_t>();
  }
  const auto [need_dx, need_dW, need_db, need_dA, need_dB] = output_mask;
  // gradients not asked for come back as distinct empty tensors (outputs of an op must not alias)
  const auto none = [&] { return at::empty({0}, x.options()); };

  at::Tensor dW = need_dW ? at::mm(g2.t(), x2) : none();
  at::Tensor db = need_db ? g2.sum(0) : none();
  auto [dx, dA, dB] = Backend::backward_rank(g2, x2, lora_A, lora_B, xa, scaling, dropout_p,
                                             dropout_p > 0 ? rng_state->const_data_ptr<int64_t>() : nullptr,
                                             keep_bits, need_dx, need_dA, need_dB);
  if (!need_dA) dA = none();
  if (!need_dB) dB = none();
  if (need_dx) {
    dx.addmm_(g2, weight);
    dx = dx.view(x.sizes());
  } else {
    dx = none();
  }
  return {dx, dW, db, dA, dB};
}

}  // namespace pyfastpeft::lora
