// The ia3 family's CPU kernel, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include <cstdint>

#include "pyfastpeft/cpu_dispatch.h"
#include "pyfastpeft/dtype.h"

namespace pyfastpeft {

// dx = dy ⊙ l (when dx is set) and dl[j] = Σ_n dy[n, j]·x[n, j] (when dl is set), over rows of dy and x
// with their own strides; dx is contiguous [n_rows, cols].
struct Ia3BackwardParams {
  const void* dy;
  const void* x;
  const void* l;
  void* dx;
  void* dl;
  int64_t n_rows, cols, dy_stride, x_stride;
  DType dtype;
};

struct Ia3CpuKernels {
  void (*scale_backward)(const Ia3BackwardParams&);
};
PFP_DECLARE_CPU_KERNELS(Ia3CpuKernels, ia3_cpu_kernels)

}  // namespace pyfastpeft
