// The quant family's CPU kernels, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "pyfastpeft/cpu_dispatch.h"
#include "quant.h"

namespace pyfastpeft {

struct QuantCpuKernels {
  void (*fake_quantize)(const FakeQuantParams&);
  void (*apply)(const FakeQuantApplyParams&);
  void (*backward)(const FakeQuantBackwardParams&);
  void (*lsq_backward)(const LsqBackwardParams&);
};
PFP_DECLARE_CPU_KERNELS(QuantCpuKernels, quant_cpu_kernels)

}  // namespace pyfastpeft
