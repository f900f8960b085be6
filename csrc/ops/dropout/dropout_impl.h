// The philox_dropout op, shared by the CPU and CUDA registrations: argument checks and a contiguous
// output; `apply` is the device's launcher (dropout_apply_cpu, or dropout_apply_cuda on the current
// stream).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "pyfastpeft/checks.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft::dropout {

template <class Apply>
at::Tensor philox_dropout(const at::Tensor& x, double p, const at::Tensor& rng_state, Apply&& apply) {
  check_float(x, "x");
  check_dropout_p(p);
  check_rng_state(rng_state, x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  apply(DropoutParams{xc.const_data_ptr(), out.mutable_data_ptr(), nullptr, nullptr, xc.numel(),
                      static_cast<float>(p), 1.0 / (1.0 - p), rng_state.const_data_ptr<int64_t>(),
                      to_dtype(x.scalar_type())});
  return out;
}

}  // namespace pyfastpeft::dropout
