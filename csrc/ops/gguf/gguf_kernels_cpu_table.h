// The gguf family's CPU kernels, one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include "gguf.h"
#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

struct GGUFCpuKernels {
  void (*linear)(const GGUFLinearParams&);
  void (*linear_backward)(const GGUFLinearBackwardParams&);
  void (*rows)(const GGUFRowsParams&);
  void (*quantize)(const GGUFQuantizeParams&);
};
PFP_DECLARE_CPU_KERNELS(GGUFCpuKernels, gguf_cpu_kernels)

}  // namespace pyfastpeft
