// The sparse family's CPU kernel, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "pyfastpeft/cpu_dispatch.h"
#include "sparse.h"

namespace pyfastpeft {

struct SparseCpuKernels {
  void (*sampled_grad)(const SampledGradParams&);
};
PFP_DECLARE_CPU_KERNELS(SparseCpuKernels, sparse_cpu_kernels)

}  // namespace pyfastpeft
