// Argument checks and shapes shared by the CPU and CUDA registrations of the multi-adapter LoRA op.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "pyfastpeft/checks.h"

namespace pyfastpeft::multi_lora {

struct Shapes {
  int64_t n_rows, in_features, out_features, num_adapters, rank;
};

// float32 for the 16-bit types and float32, float64 for float64. Not inline: g++ 12.2 at -O3
// -march=native miscompiled the inlined ternary (a cmov read the flags of an unrelated add).
[[gnu::noinline]] inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::ScalarType::Double ? at::ScalarType::Double : at::ScalarType::Float;
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

inline Shapes check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
                           const at::Tensor& adapter_indices, double dropout_p,
                           const std::optional<at::Tensor>& rng_state) {
  check_min_dim(x, "x", 1);
  check_float(x, "x");
  check_dim(weight, "weight", 2);
  check_dim(lora_A, "lora_A", 3);
  check_dim(lora_B, "lora_B", 3);
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t num_adapters = lora_A.size(0), rank = lora_A.size(1);
  check_size(x, "x", x.dim() - 1, in_features, "in_features, from weight [out, in]");
  check_size(lora_A, "lora_A", 2, in_features, "in_features, from weight [out, in]");
  check_size(lora_B, "lora_B", 0, num_adapters, "the number of adapters K, from lora_A [K, r, in]");
  check_size(lora_B, "lora_B", 1, out_features, "out_features, from weight [out, in]");
  check_size(lora_B, "lora_B", 2, rank, "the rank r, from lora_A [K, r, in]");
  check_like({{&weight, "weight"}, {&lora_A, "lora_A"}, {&lora_B, "lora_B"}}, x, "x");
  check_bias(bias, out_features, x);
  TORCH_CHECK_VALUE(scalings.dim() == 1 && scalings.size(0) == num_adapters &&
                        (scalings.scalar_type() == at::kFloat || scalings.scalar_type() == at::kDouble),
                    "scalings: expected a float32 or float64 tensor of shape [", num_adapters,
                    "] (one per adapter), got dtype ", scalings.scalar_type(), " and shape ", scalings.sizes());
  check_same_device(scalings, "scalings", x, "x");
  const int64_t n_rows = leading_numel(x);
  TORCH_CHECK_VALUE(adapter_indices.scalar_type() == at::kLong || adapter_indices.scalar_type() == at::kInt,
                    "adapter_indices: expected an int64 or int32 tensor, got ", adapter_indices.scalar_type());
  const auto token_shape = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE((adapter_indices.dim() == 1 && adapter_indices.size(0) == n_rows) ||
                        adapter_indices.sizes() == token_shape,
                    "adapter_indices: expected one index per token, shape [", n_rows, "] or ", token_shape, ", got ",
                    adapter_indices.sizes());
  check_same_device(adapter_indices, "adapter_indices", x, "x");
  check_dropout_p(dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK_VALUE(rng_state.has_value(), "rng_state: required when dropout_p > 0");
    check_rng_state(*rng_state, x, "x");
  }
  return {n_rows, in_features, out_features, num_adapters, rank};
}

// With no adapter (K = 0), rank 0, or an empty product (no token, no input or no output feature) the
// LoRA term x·Aᵀ·Bᵀ is zero and so are dA and dB: the base layer alone, computed here so that the
// kernels only ever see non-empty work.
inline bool lora_term_is_empty(const Shapes& s) {
  return s.num_adapters == 0 || s.rank == 0 || s.n_rows == 0 || s.in_features == 0 || s.out_features == 0;
}

// The CPU op refuses an index outside [-1, K) (the CUDA op reads it as -1, to stay free of host syncs).
inline void check_index_range_host(const at::Tensor& adapter_indices, int64_t num_adapters) {
  const at::Tensor flat = adapter_indices.reshape({-1});
  const at::Tensor bad = at::nonzero(at::logical_or(at::lt(flat, -1), at::ge(flat, num_adapters)));
  if (bad.numel() == 0) return;
  const int64_t token = bad.select(0, 0).select(0, 0).item<int64_t>();
  TORCH_CHECK_VALUE(false, "adapter_indices: index ", flat.select(0, token).item<int64_t>(), " at token ", token,
                    " is out of range for ", num_adapters, " adapters (expected -1 for no adapter, or 0..",
                    num_adapters - 1, ")");
}

inline std::tuple<at::Tensor, at::Tensor> forward_base_only(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias, const Shapes& s) {
  at::Tensor y = at::linear(as_rows(x), weight, bias).view(with_last(x.sizes(), s.out_features));
  return {y, at::zeros({s.n_rows, s.rank}, x.options().dtype(acc_scalar_type(x.scalar_type())))};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_base_only(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, std::array<bool, 5> output_mask) {
  const at::Tensor g2 = as_rows(grad_y), x2 = as_rows(x);
  const auto none = [&] { return at::empty({0}, x.options()); };
  const auto [need_dx, need_dW, need_db, need_dA, need_dB] = output_mask;
  return {need_dx ? at::mm(g2, weight).view(x.sizes()) : none(), need_dW ? at::mm(g2.t(), x2) : none(),
          need_db ? g2.sum(0) : none(), need_dA ? at::zeros_like(lora_A) : none(),
          need_dB ? at::zeros_like(lora_B) : none()};
}

inline void check_backward_inputs(const Shapes& s, const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& xa) {
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(with_last(x.sizes(), s.out_features)), "grad_y: expected shape ",
                    with_last(x.sizes(), s.out_features), ", got ", grad_y.sizes());
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
  check_dim(xa, "xa", 2);
  check_size(xa, "xa", 0, s.n_rows, "tokens");
  check_size(xa, "xa", 1, s.rank, "rank");
  TORCH_CHECK_VALUE(xa.scalar_type() == acc_scalar_type(x.scalar_type()), "xa: expected dtype ",
                    acc_scalar_type(x.scalar_type()), ", got ", xa.scalar_type());
  check_same_device(xa, "xa", x, "x");
}

}  // namespace pyfastpeft::multi_lora
