// CPU glue of the distillation family: registration. The kernel (distill_kernels_cpu.cpp, compiled
// once per CPU capability level) runs through distill_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include "distill.h"
#include "distill_impl.h"
#include "distill_kernels_cpu.h"

namespace pyfastpeft {
namespace {

struct CpuBackend {
  static void rows(const KdLossParams& params) { kd_loss_rows_cpu(params); }
  static bool any_bad_label(const at::Tensor& bad_label) { return *bad_label.const_data_ptr<int32_t>() != 0; }
};

}  // namespace

void kd_loss_rows_cpu(const KdLossParams& params) { distill_cpu_kernels().kd_loss_rows(params); }

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("kd_loss", &distill::kd_loss<CpuBackend>);
  m.impl("fused_linear_kd_loss", &distill::fused_linear_kd_loss<CpuBackend>);
  m.impl("fused_linear_cross_entropy", &distill::fused_linear_cross_entropy<CpuBackend>);
}

}  // namespace pyfastpeft
