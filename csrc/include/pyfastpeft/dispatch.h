// dtype switch for CPU kernels: one template per kernel, instantiated for every supported float type.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "pyfastpeft/dtype.h"

#define PFP_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace pyfastpeft {
// Accumulation type: float for the 16-bit types and float32, double for float64.
template <typename T>
using acc_type = at::opmath_type<T>;

// ``Kernel<T>::run(params)`` for the element type named by ``params.dtype`` (a kernel table's entry
// point: the table stores one function per kernel, the element type travels in the parameters).
template <template <typename> class Kernel, typename Params>
void dispatch_dtype(const Params& params) {
  switch (params.dtype) {
    case DType::Float64: return Kernel<double>::run(params);
    case DType::Float32: return Kernel<float>::run(params);
    case DType::BFloat16: return Kernel<c10::BFloat16>::run(params);
    case DType::Float16: return Kernel<c10::Half>::run(params);
  }
}
}  // namespace pyfastpeft
