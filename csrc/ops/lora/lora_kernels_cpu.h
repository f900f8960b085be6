// The LoRA family's CPU kernels, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "lora.h"
#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

struct LoraCpuKernels {
  void (*shrink_dropout)(const LoraShrinkParams&);  // p > 0
  void (*dropout_backward)(const LoraDropoutBackwardParams&);
};
PFP_DECLARE_CPU_KERNELS(LoraCpuKernels, lora_cpu_kernels)

}  // namespace pyfastpeft
