// Argument checks and shape handling shared by the CPU and CUDA backends of the bias family.
#pragma once
#include <ATen/core/Tensor.h>

#include "pyfastpeft/checks.h"

namespace pyfastpeft::bias {

inline void check_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_float(x, "x");
  check_min_dim(x, "x", 1);
  check_dim(weight, "weight", 2);
  check_dim(bias, "bias", 1);
  check_same_dtype(weight, "weight", x, "x");
  check_same_dtype(bias, "bias", x, "x");
  check_same_device(weight, "weight", x, "x");
  check_same_device(bias, "bias", x, "x");
  check_size(x, "x", x.dim() - 1, weight.size(1), "in_features of weight");
  check_size(bias, "bias", 0, weight.size(0), "out_features of weight");
}

inline void check_backward(const at::Tensor& grad_y, const at::Tensor& weight) {
  check_float(grad_y, "grad_y");
  check_min_dim(grad_y, "grad_y", 1);
  check_dim(weight, "weight", 2);
  check_same_dtype(weight, "weight", grad_y, "grad_y");
  check_same_device(weight, "weight", grad_y, "grad_y");
  check_size(grad_y, "grad_y", grad_y.dim() - 1, weight.size(0), "out_features of weight");
}

// grad_y as [N, out] with unit column stride: a view when the strides allow, else one copy.
inline at::Tensor rows_view(const at::Tensor& grad_y) {
  at::Tensor dy2 = as_rows(grad_y);
  if (dy2.size(1) > 1 && dy2.stride(1) != 1) dy2 = dy2.contiguous();
  return dy2;
}

// dx with the leading dimensions of grad_y and in_features last.
inline std::vector<int64_t> dx_shape(const at::Tensor& grad_y, const at::Tensor& weight) {
  std::vector<int64_t> shape(grad_y.sizes().begin(), grad_y.sizes().end());
  shape.back() = weight.size(1);
  return shape;
}

}  // namespace pyfastpeft::bias
