// The bias family's CPU kernel, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include <cstdint>

#include "pyfastpeft/cpu_dispatch.h"
#include "pyfastpeft/dtype.h"

namespace pyfastpeft {

// out[o] = Σ_n dy[n·row_stride + o] over n < n_rows, in fixed slabs of rows (independent of the threads).
struct BiasColumnSumParams {
  const void* dy;
  int64_t n_rows, cols, row_stride;
  void* out;  // [cols]
  DType dtype;
};

struct BiasCpuKernels {
  void (*column_sums)(const BiasColumnSumParams&);
};
PFP_DECLARE_CPU_KERNELS(BiasCpuKernels, bias_cpu_kernels)

}  // namespace pyfastpeft
