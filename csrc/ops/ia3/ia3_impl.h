// Argument checks and shape handling shared by the CPU and CUDA backends of the ia3 family.
#pragma once
#include <ATen/core/Tensor.h>

#include "pyfastpeft/checks.h"

namespace pyfastpeft::ia3 {

inline void check_forward(const at::Tensor& x, const at::Tensor& scale) {
  check_float(x, "x");
  check_min_dim(x, "x", 1);
  check_dim(scale, "scale", 1);
  check_same_dtype(scale, "scale", x, "x");
  check_same_device(scale, "scale", x, "x");
  check_size(scale, "scale", 0, x.size(-1), "the last dimension of x");
}

inline void check_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale) {
  check_forward(x, scale);
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y: expected the shape of x ", x.sizes(), ", got ",
                    grad_y.sizes());
}

// t as [N, d] with unit column stride: a view when the strides allow, else one copy.
inline at::Tensor rows_view(const at::Tensor& t) {
  at::Tensor t2 = as_rows(t);
  if (t2.size(1) > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

}  // namespace pyfastpeft::ia3
