// The LoRA family's CPU kernels, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "lora.h"
#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

struct LoraCpuKernels {
  // whether expand, outer and project (and the p = 0 shrink) run at this level: float32 and float64
  // take them where the level has FMA; otherwise the glue calls the BLAS
  bool tiled;
  void (*shrink)(const LoraShrinkParams&);
  void (*expand)(const LoraExpandParams&);
  void (*outer)(const LoraOuterParams&);
  void (*project)(const LoraProjectParams&);
  void (*dropout_backward)(const LoraDropoutBackwardParams&);
};
PFP_DECLARE_CPU_KERNELS(LoraCpuKernels, lora_cpu_kernels)

}  // namespace pyfastpeft
