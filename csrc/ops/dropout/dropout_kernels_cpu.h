// The dropout family's CPU kernel, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "pyfastpeft/cpu_dispatch.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft {

struct DropoutCpuKernels {
  void (*apply)(const DropoutParams&);
};
PFP_DECLARE_CPU_KERNELS(DropoutCpuKernels, dropout_cpu_kernels)

}  // namespace pyfastpeft
