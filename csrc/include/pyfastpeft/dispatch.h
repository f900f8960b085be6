// dtype switch for CPU kernels: one template per kernel, instantiated for every supported float type.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define PFP_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace pyfastpeft {
// Accumulation type: float for the 16-bit types and float32, double for float64.
template <typename T>
using acc_type = at::opmath_type<T>;
}  // namespace pyfastpeft
