// CUDA glue of the LoRA family: tensors → params, device guard, current stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>

#include "lora.h"
#include "lora_impl.h"
#include "pyfastpeft/checks.h"
#include "pyfastpeft/cuda_glue.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft {
namespace {

struct CudaBackend {
  static void dropout(const DropoutParams& params) {
    launch("dropout", [&] { dropout_apply_cuda(params, current_stream()); });
  }
  static at::Tensor shrink(const at::Tensor& x2, const at::Tensor& lora_A, double p, const int64_t* rng) {
    const at::Tensor xc = x2.contiguous();
    const at::Tensor Ac = lora_A.contiguous();
    at::Tensor xa = at::empty({xc.size(0), Ac.size(0)}, xc.options());
    const LoraShrinkParams params{xc.const_data_ptr(), Ac.const_data_ptr(), xa.mutable_data_ptr(),
                                  xc.size(0),          xc.size(1),          Ac.size(0),
                                  static_cast<float>(p), p > 0 ? 1.0 / (1.0 - p) : 1.0, p > 0 ? rng : nullptr,
                                  to_dtype(xc.scalar_type())};
    launch("lora_shrink", [&] { lora_shrink_cuda(params, current_stream()); });
    return xa;
  }

  // drop'(u·A) and uᵀ·drop(x): the rank-r products on cuBLAS, the mask applied to both in one kernel.
  static std::pair<at::Tensor, at::Tensor> dropout_grads(const at::Tensor& x2, const at::Tensor& u,
                                                         const at::Tensor& lora_A, double p, const int64_t* rng,
                                                         bool need_dx, bool need_dA) {
    const at::Tensor xc = x2.contiguous();
    at::Tensor dx = need_dx ? at::mm(u, lora_A) : at::Tensor();
    at::Tensor xd = need_dA ? at::empty_like(xc) : at::Tensor();
    const DropoutParams params{need_dA ? xc.const_data_ptr() : dx.const_data_ptr(),
                               need_dA ? xd.mutable_data_ptr() : dx.mutable_data_ptr(),
                               need_dA && need_dx ? dx.const_data_ptr() : nullptr,
                               need_dA && need_dx ? dx.mutable_data_ptr() : nullptr,
                               xc.numel(),
                               static_cast<float>(p),
                               1.0 / (1.0 - p),
                               rng,
                               to_dtype(xc.scalar_type())};
    dropout(params);
    return {dx, need_dA ? at::mm(u.t(), xd) : at::Tensor()};
  }

  // the backward regenerates the mask, so no bits are kept (an empty keep)
  static std::pair<at::Tensor, at::Tensor> forward_rank(const at::Tensor& x2, const at::Tensor& lora_A,
                                                        const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                                                        double scaling, double p, const int64_t* rng, at::Tensor& y) {
    const at::Tensor xa = shrink(x2, lora_A, p, rng);
    if (bias) {
      at::addmm_out(y, *bias, xa, lora_B.t(), 1, scaling);
    } else {
      at::addmm_out(y, y, xa, lora_B.t(), 0, scaling);
    }
    return {xa, at::empty({0}, x2.options().dtype(at::kByte))};
  }

  // dB = s·dyᵀ·xa, u = s·dy·B, then dx = drop'(u·A) and dA = uᵀ·drop(x) with one mask pass
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_rank(
      const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B,
      const at::Tensor& xa, double scaling, double p, const int64_t* rng, const uint8_t* /*keep: a CPU tensor's*/,
      bool need_dx, bool need_dA, bool need_dB) {
    at::Tensor dx, dA, dB;
    if (need_dB) {
      // as (xaᵀ·dy)ᵀ: the BLAS streams dy far faster with the long dimension as the reduction
      at::Tensor dB_t = at::empty({lora_B.size(1), lora_B.size(0)}, x2.options());
      at::addmm_out(dB_t, dB_t, xa.t(), g2, 0, scaling);
      dB = dB_t.t().contiguous();
    }
    if (!need_dx && !need_dA) return {dx, dA, dB};
    at::Tensor u = at::empty({x2.size(0), lora_A.size(0)}, x2.options());
    at::addmm_out(u, u, g2, lora_B, 0, scaling);
    if (p > 0) {
      std::tie(dx, dA) = dropout_grads(x2, u, lora_A, p, rng, need_dx, need_dA);
    } else {
      if (need_dx) dx = at::mm(u, lora_A);
      if (need_dA) dA = at::mm(u.t(), x2);
    }
    return {dx, dA, dB};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling, double dropout_p,
                                                    const std::optional<at::Tensor>& rng_state) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora::forward<CudaBackend>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& keep,
    std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora::backward<CudaBackend>(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng_state, keep,
                                     output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace pyfastpeft
