// The quant ops' argument checks and tensor plumbing, shared by the CPU and CUDA registrations.
// `Backend` supplies the device kernels:
//   static void fake_quantize(const FakeQuantParams&);
//   static void apply(const FakeQuantApplyParams&);
//   static void backward(const FakeQuantBackwardParams&);
//   static std::tuple<at::Tensor, at::Tensor> lsq_backward(LsqBackwardParams&, const at::Tensor& scale, bool has_zp);
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>
#include <vector>

#include "pyfastpeft/checks.h"
#include "quant.h"

namespace pyfastpeft::quant {

struct Scheme {
  QuantLayout layout;
  std::vector<int64_t> scale_shape;
  int qmin, qmax;
};

// group_size: 0 per tensor, -1 per channel along `axis`, g > 0 groups of g along the last dimension.
inline Scheme make_scheme(const at::Tensor& x, int64_t bits, int64_t group_size, int64_t axis) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "bits: expected an integer width in [2, 8], got ", bits);
  Scheme s;
  s.qmin = -(1 << (bits - 1));
  s.qmax = (1 << (bits - 1)) - 1;
  const int64_t numel = x.numel();
  if (group_size == 0) {
    s.layout = {1, 1, numel};
  } else if (group_size == -1) {
    check_min_dim(x, "x", 1);
    const int64_t dim = x.dim();
    TORCH_CHECK_VALUE(axis >= -dim && axis < dim, "axis: expected a dimension in [", -dim, ", ", dim - 1, "] of x ",
                      x.sizes(), ", got ", axis);
    const int64_t a = axis < 0 ? axis + dim : axis;
    int64_t pre = 1, post = 1;
    for (int64_t d = 0; d < a; ++d) pre *= x.size(d);
    for (int64_t d = a + 1; d < dim; ++d) post *= x.size(d);
    s.layout = {pre, x.size(a), post};
    s.scale_shape = {x.size(a)};
  } else {
    TORCH_CHECK_VALUE(group_size > 0, "group_size: expected -1 (per channel), 0 (per tensor) or a positive group size, got ",
                      group_size);
    check_min_dim(x, "x", 1);
    const int64_t last = x.size(-1);
    TORCH_CHECK_VALUE(last % group_size == 0, "group_size: ", group_size, " does not divide the last dimension of x ",
                      x.sizes(), " (", last, ")");
    s.layout = {1, numel / group_size, group_size};
    s.scale_shape = std::vector<int64_t>(x.sizes().begin(), x.sizes().end());
    s.scale_shape.back() = last / group_size;
  }
  return s;
}

inline at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_qparam(const at::Tensor& t, const char* name, const at::Tensor& x, const Scheme& s,
                         at::ScalarType dtype) {
  check_same_device(t, name, x, "x");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes().vec() == s.scale_shape, name, ": expected shape ", at::IntArrayRef(s.scale_shape),
                    " (one entry per quantization group), got ", t.sizes());
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize(const at::Tensor& x, int64_t bits, int64_t group_size,
                                                             bool symmetric, int64_t axis) {
  const Scheme s = make_scheme(x, bits, group_size, axis);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor scale = at::empty(s.scale_shape, xc.options().dtype(acc_dtype(x)));
  at::Tensor zero_point = at::empty(s.scale_shape, xc.options().dtype(at::kInt));
  if (xc.numel() > 0) {
    Backend::fake_quantize({xc.const_data_ptr(), out.mutable_data_ptr(), scale.mutable_data_ptr(),
                            zero_point.mutable_data_ptr<int32_t>(), s.layout, s.qmin, s.qmax, symmetric,
                            to_dtype(xc.scalar_type())});
  } else {  // empty groups: the formula with lo = hi = 0, as for an all-zero group
    scale.fill_(kQuantEps);
    zero_point.fill_(symmetric ? 0 : s.qmin);
  }
  return {out, scale, zero_point};
}

template <class Backend>
at::Tensor fake_quantize_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t bits, int64_t group_size, int64_t axis) {
  const Scheme s = make_scheme(x, bits, group_size, axis);
  check_same_dtype(grad_out, "grad_out", x, "x");
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "grad_out: expected shape ", x.sizes(), ", got ", grad_out.sizes());
  check_qparam(scale, "scale", x, s, acc_dtype(x));
  check_qparam(zero_point, "zero_point", x, s, at::kInt);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor sc = scale.contiguous(), zc = zero_point.contiguous();
  at::Tensor dx = at::empty_like(xc);
  if (xc.numel() == 0) return dx;
  Backend::backward({gc.const_data_ptr(), xc.const_data_ptr(), dx.mutable_data_ptr(), sc.const_data_ptr(),
                     zc.const_data_ptr<int32_t>(), s.layout, s.qmin, s.qmax, to_dtype(xc.scalar_type())});
  return dx;
}

// The learnable path's (scale, zero point) as the kernels use them: scale >= eps, zero point rounded
// half to even and clamped to the code range.
inline std::tuple<at::Tensor, at::Tensor> lsq_qparams(const at::Tensor& x, const at::Tensor& scale,
                                                      const std::optional<at::Tensor>& zero_point, const Scheme& s) {
  check_qparam(scale, "scale", x, s, acc_dtype(x));
  at::Tensor sc = scale.clamp_min(kQuantEps).contiguous();
  at::Tensor zc;
  if (zero_point) {
    check_qparam(*zero_point, "zero_point", x, s, acc_dtype(x));
    zc = zero_point->round().clamp(s.qmin, s.qmax).to(at::kInt).contiguous();
  } else {
    zc = at::zeros(s.scale_shape, x.options().dtype(at::kInt));
  }
  return {sc, zc};
}

template <class Backend>
at::Tensor fake_quantize_lsq(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                             int64_t bits, int64_t group_size, int64_t axis, double grad_factor) {
  const Scheme s = make_scheme(x, bits, group_size, axis);
  auto [sc, zc] = lsq_qparams(x, scale, zero_point, s);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  Backend::apply({xc.const_data_ptr(), out.mutable_data_ptr(), sc.const_data_ptr(), zc.const_data_ptr<int32_t>(),
                  s.layout, s.qmin, s.qmax, to_dtype(xc.scalar_type())});
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_lsq_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size, int64_t axis, double grad_factor,
    bool need_grad_x) {
  const Scheme s = make_scheme(x, bits, group_size, axis);
  check_same_dtype(grad_out, "grad_out", x, "x");
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "grad_out: expected shape ", x.sizes(), ", got ", grad_out.sizes());
  auto [sc, zc] = lsq_qparams(x, scale, zero_point, s);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  at::Tensor dx = need_grad_x ? at::empty_like(xc) : at::empty({0}, xc.options());
  LsqBackwardParams params{gc.const_data_ptr(),
                           xc.const_data_ptr(),
                           need_grad_x ? dx.mutable_data_ptr() : nullptr,
                           sc.const_data_ptr(),
                           zc.const_data_ptr<int32_t>(),
                           nullptr,
                           nullptr,
                           s.layout,
                           s.qmin,
                           s.qmax,
                           grad_factor,
                           to_dtype(xc.scalar_type())};
  if (xc.numel() == 0) {
    at::Tensor dz = zero_point ? at::zeros(s.scale_shape, sc.options()) : at::empty({0}, sc.options());
    return {dx, at::zeros(s.scale_shape, sc.options()), dz};
  }
  auto [dscale, dzero] = Backend::lsq_backward(params, sc, zero_point.has_value());
  return {dx, dscale.view(s.scale_shape), zero_point ? dzero.view(s.scale_shape) : dzero};
}

}  // namespace pyfastpeft::quant
