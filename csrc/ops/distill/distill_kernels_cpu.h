// The distillation family's CPU kernel, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "distill.h"
#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

struct DistillCpuKernels {
  void (*kd_loss_rows)(const KdLossParams&);
};
PFP_DECLARE_CPU_KERNELS(DistillCpuKernels, distill_cpu_kernels)

}  // namespace pyfastpeft
