// CPU glue of the dropout family: the launcher other families call, and the philox_dropout op. The
// kernel (dropout_kernels_cpu.cpp, compiled once per CPU capability level) runs through
// dropout_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dropout_impl.h"
#include "dropout_kernels_cpu.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft {

void dropout_apply_cpu(const DropoutParams& params) { dropout_cpu_kernels().apply(params); }

namespace {

at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& rng_state) {
  return dropout::philox_dropout(x, p, rng_state, [](const DropoutParams& params) { dropout_apply_cpu(params); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) { m.impl("philox_dropout", &philox_dropout_cpu); }

}  // namespace pyfastpeft
