// CPU glue of the LoRA family: the ops' argument checks, allocation and registration. The kernels
// (lora_kernels_cpu.cpp, compiled once per CPU capability level) run through lora_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <utility>

#include "lora.h"
#include "lora_impl.h"
#include "lora_kernels_cpu.h"

namespace pyfastpeft {
namespace {

struct CpuBackend {
  static at::Tensor shrink(const at::Tensor& x2, const at::Tensor& lora_A, double p, const int64_t* rng) {
    if (p == 0) return at::mm(x2, lora_A.t());
    const at::Tensor xc = x2.contiguous(), Ac = lora_A.contiguous();
    at::Tensor xa = at::empty({xc.size(0), Ac.size(0)}, xc.options());
    lora_cpu_kernels().shrink_dropout(LoraShrinkParams{xc.const_data_ptr(), Ac.const_data_ptr(), xa.mutable_data_ptr(),
                                            xc.size(0), xc.size(1), Ac.size(0), static_cast<float>(p),
                                            1.0 / (1.0 - p), rng, to_dtype(xc.scalar_type())});
    return xa;
  }

  static std::pair<at::Tensor, at::Tensor> dropout_grads(const at::Tensor& x2, const at::Tensor& u,
                                                         const at::Tensor& lora_A, double p, const int64_t* rng,
                                                         bool need_dx, bool need_dA) {
    const at::Tensor xc = x2.contiguous(), uc = u.contiguous(), Ac = lora_A.contiguous();
    at::Tensor dx = need_dx ? at::empty_like(xc) : at::Tensor();
    at::Tensor dA = need_dA ? at::empty_like(Ac) : at::Tensor();
    lora_cpu_kernels().dropout_backward(LoraDropoutBackwardParams{
        xc.const_data_ptr(), uc.const_data_ptr(), Ac.const_data_ptr(), need_dx ? dx.mutable_data_ptr() : nullptr,
        need_dA ? dA.mutable_data_ptr() : nullptr, xc.size(0), xc.size(1), Ac.size(0), static_cast<float>(p),
        1.0 / (1.0 - p), rng, to_dtype(xc.scalar_type())});
    return {dx, dA};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("lora_linear", &lora::forward<CpuBackend>);
  m.impl("lora_linear_backward", &lora::backward<CpuBackend>);
}

}  // namespace pyfastpeft
