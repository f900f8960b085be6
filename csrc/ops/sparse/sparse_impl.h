// The sparse-delta linear's composition, shared by the CPU and CUDA registrations. The dense products
// go to the BLAS through ATen with W₀ + Δ formed once per call (Δ scattered into a copy of W₀), and the
// gradient of Δ comes from the sampled-gradient kernel. `Backend` supplies:
//   static void check_indices(const at::Tensor& indices, int64_t numel);   sorted, unique, in range
//   static at::Tensor sampled_grad(const at::Tensor& gy2, const at::Tensor& x2, const at::Tensor& idx,
//                                  int64_t in_features);
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_unique.h>
#include <ATen/ops/all.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/index_add.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "pyfastpeft/checks.h"
#include "sparse.h"

namespace pyfastpeft::sparse {

inline void check_index_tensor(const at::Tensor& indices) {
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                    "indices: expected an int64 or int32 tensor, got ", indices.scalar_type());
  check_dim(indices, "indices", 1);
}

// A CPU loop over the (host) indices; the CUDA backend reduces on the device and reads back one flag.
inline void check_indices_host(const at::Tensor& indices, int64_t numel) {
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < numel, "indices: entry ", j, " is ", p[j],
                      ", out of range for a weight with ", numel, " elements");
    TORCH_CHECK_VALUE(j == 0 || p[j] > p[j - 1], "indices: expected strictly increasing (sorted, no duplicate) ",
                      "flat indices, but entry ", j, " (", p[j], ") follows ", p[j - 1]);
  }
}

inline void check_delta(const at::Tensor& delta, const at::Tensor& indices, const at::Tensor& weight) {
  check_dim(delta, "delta", 1);
  check_size(delta, "delta", 0, indices.numel(), "k, the number of indices");
  check_same_dtype(delta, "delta", weight, "weight");
  check_same_device(delta, "delta", weight, "weight");
  check_same_device(indices, "indices", weight, "weight");
}

inline void check_x(const at::Tensor& x, const at::Tensor& weight) {
  check_min_dim(x, "x", 1);
  check_float(x, "x");
  check_dim(weight, "weight", 2);
  check_size(x, "x", x.dim() - 1, weight.size(1), "in_features, from weight [out, in]");
  check_same_dtype(weight, "weight", x, "x");
  check_same_device(weight, "weight", x, "x");
}

inline at::Tensor effective_weight(const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& indices) {
  at::Tensor w = weight.contiguous().clone();
  w.view({-1}).index_add_(0, indices, delta);
  return w;
}

template <class Backend>
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& delta, const at::Tensor& indices) {
  check_x(x, weight);
  check_index_tensor(indices);
  check_delta(delta, indices, weight);
  check_bias(bias, weight.size(0), x);
  Backend::check_indices(indices, weight.numel());
  return at::linear(x, effective_weight(weight, delta, indices), bias);
}

// (dx, dbias, ddelta); entries whose output_mask is false are empty tensors.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& delta,
                                                        const at::Tensor& indices, std::array<bool, 3> output_mask) {
  check_x(x, weight);
  check_index_tensor(indices);
  check_delta(delta, indices, weight);
  Backend::check_indices(indices, weight.numel());  // the indices are read here too, not only in the forward
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK_VALUE(grad_y.sizes().slice(0, grad_y.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                        grad_y.size(-1) == out_features,
                    "grad_y: expected shape [..., ", out_features, "] with the leading dimensions of x ", x.sizes(),
                    ", got ", grad_y.sizes());
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
  const at::Tensor gy2 = as_rows(grad_y);
  const at::Tensor x2 = as_rows(x);
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = empty(), db = empty(), ddelta = empty();
  if (output_mask[0]) dx = at::mm(gy2, effective_weight(weight, delta, indices)).view(x.sizes());
  if (output_mask[1]) db = at::sum(gy2, {0});
  if (output_mask[2]) ddelta = Backend::sampled_grad(gy2, x2, indices, in_features);
  return {dx, db, ddelta};
}

// The op itself: dΔ at the k indices.
template <class Backend>
at::Tensor sampled_weight_grad(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& indices,
                               int64_t in_features) {
  check_min_dim(x, "x", 1);
  check_float(x, "x");
  check_size(x, "x", x.dim() - 1, in_features, "in_features");
  check_min_dim(grad_y, "grad_y", 1);
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
  check_same_device(indices, "indices", x, "x");
  TORCH_CHECK_VALUE(grad_y.sizes().slice(0, grad_y.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "grad_y: expected the leading dimensions of x ", x.sizes(), ", got shape ", grad_y.sizes());
  check_index_tensor(indices);
  const int64_t out_features = grad_y.size(-1), k = indices.numel();
  const at::Tensor gy2 = as_rows(grad_y), x2 = as_rows(x);
  // The kernels walk the indices in increasing order (sparse.h). Here any order and repeats are valid
  // (each output is its own dot product): other indices run on their sorted distinct values and the
  // results are gathered back into the caller's order.
  if (k < 2 || at::all(at::gt(indices.slice(0, 1), indices.slice(0, 0, k - 1))).item<bool>()) {
    Backend::check_indices(indices, out_features * in_features);
    return Backend::sampled_grad(gy2, x2, indices, in_features);
  }
  const auto [distinct, inverse] = at::_unique(indices, /*sorted=*/true, /*return_inverse=*/true);
  Backend::check_indices(distinct, out_features * in_features);
  return at::index_select(Backend::sampled_grad(gy2, x2, distinct, in_features), 0, inverse);
}

}  // namespace pyfastpeft::sparse
