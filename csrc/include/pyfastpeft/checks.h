// Argument checks shared by every op. Each failure names the argument and what was expected, and is
// raised as a Python ValueError (c10::ValueError) so users can tell bad input from an internal error.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <utility>

#include "pyfastpeft/dtype.h"

namespace pyfastpeft {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::Float64;
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t, " (expected float64, float32, bfloat16 or float16)");
  }
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), name, ": expected a float64, float32, bfloat16 or float16 tensor, got ",
                    t.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(), "-D with shape ", t.sizes());
}

inline void check_min_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() >= dim, name, ": expected at least ", dim, " dimension(s), got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, ": expected size ", expected, " in dimension ", dim, " (", what,
                    "), got shape ", t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (the dtype of ",
                    ref_name, "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ", ref_name,
                    "), got ", t.device());
}

// Each present tensor argument (pointer, argument name; nullptr for an absent optional one) is on `ref`'s
// device. A call mixing a meta tensor with real ones never gets here: the dispatcher sends it to the
// fake kernel, which makes the same check (pyfastpeft/ops/_checks.py).
inline void check_same_devices(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors,
                               const at::Tensor& ref, const char* ref_name) {
  for (const auto& [t, name] : tensors) {
    if (t != nullptr && t->defined()) check_same_device(*t, name, ref, ref_name);
  }
}

// The product of x's leading dimensions: its rows as [rows, x.size(-1)]. reshape({-1, 0}) cannot infer
// the rows of a zero-width input, so every op views its input through this.
inline int64_t leading_numel(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

inline at::Tensor as_rows(const at::Tensor& x) { return x.reshape({leading_numel(x), x.size(-1)}); }

// Each of `tensors` (pointer, argument name) has the dtype and device of `ref`.
inline void check_like(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors, const at::Tensor& ref,
                       const char* ref_name) {
  for (const auto& [t, name] : tensors) {
    check_same_dtype(*t, name, ref, ref_name);
    check_same_device(*t, name, ref, ref_name);
  }
}

// An optional linear bias: 1-D [out_features] with x's dtype and device.
inline void check_bias(const std::optional<at::Tensor>& bias, int64_t out_features, const at::Tensor& x) {
  if (!bias) return;
  check_dim(*bias, "bias", 1);
  check_size(*bias, "bias", 0, out_features, "out_features, from weight [out, in]");
  check_like({{&*bias, "bias"}}, x, "x");
}

// rng_state is an int64 tensor [seed, offset] on the device of the data it masks.
inline void check_rng_state(const at::Tensor& rng_state, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 && rng_state.numel() == 2 &&
                        rng_state.is_contiguous(),
                    "rng_state: expected a contiguous int64 tensor [seed, offset], got dtype ", rng_state.scalar_type(),
                    " and shape ", rng_state.sizes());
  check_same_device(rng_state, "rng_state", ref, ref_name);
}

inline void check_dropout_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p: expected a probability in [0, 1), got ", p);
}

}  // namespace pyfastpeft
