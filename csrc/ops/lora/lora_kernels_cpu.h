// The LoRA family's CPU kernels, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "lora.h"
#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

struct LoraCpuKernels {
  void (*forward_rank)(const LoraForwardRankParams&);
  void (*backward_rank)(const LoraBackwardRankParams&);
};
PFP_DECLARE_CPU_KERNELS(LoraCpuKernels, lora_cpu_kernels)

}  // namespace pyfastpeft
