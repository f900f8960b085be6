// The optim family's CPU kernels, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "optim.h"
#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

struct OptimCpuKernels {
  void (*adamw)(const AdamWParams&);
  void (*l2_norm)(const L2NormParams&);
};
PFP_DECLARE_CPU_KERNELS(OptimCpuKernels, optim_cpu_kernels)

}  // namespace pyfastpeft
