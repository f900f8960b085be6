// CUDA glue of the dropout family: tensors → params, device guard, current stream, registration.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dropout_impl.h"
#include "pyfastpeft/cuda_glue.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft {
namespace {

at::Tensor philox_dropout_cuda(const at::Tensor& x, double p, const at::Tensor& rng_state) {
  const c10::cuda::CUDAGuard guard(x.device());
  return dropout::philox_dropout(x, p, rng_state, [](const DropoutParams& params) {
    launch("dropout", [&] { dropout_apply_cuda(params, current_stream()); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) { m.impl("philox_dropout", &philox_dropout_cuda); }

}  // namespace pyfastpeft
