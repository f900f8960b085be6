// CPU glue of the LoRA family: the ops' argument checks, allocation and registration. The kernels
// (lora_kernels_cpu.cpp, compiled once per CPU capability level) run through lora_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <utility>

#include "lora.h"
#include "lora_impl.h"
#include "lora_kernels_cpu.h"

namespace pyfastpeft {
namespace {

struct CpuBackend {
  // with dropout, the mask is kept as bits (N·in/8 bytes) for the backward, which then draws nothing
  static std::pair<at::Tensor, at::Tensor> forward_rank(const at::Tensor& x2, const at::Tensor& lora_A,
                                                        const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                                                        double scaling, double p, const int64_t* rng, at::Tensor& y) {
    const at::Tensor xc = x2.contiguous(), Ac = lora_A.contiguous(), Bc = lora_B.contiguous();
    at::Tensor xa = at::empty({xc.size(0), Ac.size(0)}, xc.options());
    at::Tensor keep = at::zeros({p > 0 ? dropout_keep_bytes(xc.numel()) : 0}, xc.options().dtype(at::kByte));
    if (xc.size(0) == 0) return {xa, keep};
    const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
    lora_cpu_kernels().forward_rank(LoraForwardRankParams{
        xc.const_data_ptr(), Ac.const_data_ptr(), Bc.const_data_ptr(), bc.defined() ? bc.const_data_ptr() : nullptr,
        xa.mutable_data_ptr(), y.mutable_data_ptr(), p > 0 ? keep.mutable_data_ptr() : nullptr, xc.size(0),
        xc.size(1), Bc.size(0), Ac.size(0), scaling, static_cast<float>(p), p > 0 ? 1.0 / (1.0 - p) : 1.0,
        p > 0 ? rng : nullptr, to_dtype(xc.scalar_type())});
    return {xa, keep};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_rank(
      const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B,
      const at::Tensor& xa, double scaling, double p, const int64_t* rng, const uint8_t* keep, bool need_dx,
      bool need_dA, bool need_dB) {
    const at::Tensor gc = g2.contiguous(), xc = x2.contiguous(), Ac = lora_A.contiguous(), Bc = lora_B.contiguous();
    const at::Tensor xac = xa.contiguous();
    at::Tensor dx = need_dx ? at::empty_like(xc) : at::Tensor();
    at::Tensor dA = need_dA ? at::empty_like(Ac) : at::Tensor();
    at::Tensor dB;
    // float32/float64 reduce dB inside the kernel's region; a 16-bit dB is one product, accumulated in
    // float32 by the BLAS and rounded once (per-part sums would each be rounded to 16 bits)
    const bool dB_in_kernel = need_dB && (xc.scalar_type() == at::kFloat || xc.scalar_type() == at::kDouble);
    if (need_dB) {
      if (dB_in_kernel) {
        dB = at::empty_like(Bc);
      } else {
        at::Tensor dB_t = at::empty({Bc.size(1), Bc.size(0)}, xc.options());
        at::addmm_out(dB_t, dB_t, xac.t(), gc, 0, scaling);
        dB = dB_t.t().contiguous();
      }
    }
    if (xc.size(0) == 0) {
      if (need_dA) dA.zero_();
      if (dB_in_kernel) dB.zero_();
      return {dx, dA, dB};
    }
    lora_cpu_kernels().backward_rank(LoraBackwardRankParams{
        gc.const_data_ptr(), xc.const_data_ptr(), Ac.const_data_ptr(), Bc.const_data_ptr(), xac.const_data_ptr(),
        need_dx ? dx.mutable_data_ptr() : nullptr, need_dA ? dA.mutable_data_ptr() : nullptr,
        dB_in_kernel ? dB.mutable_data_ptr() : nullptr, keep, xc.size(0), xc.size(1), Bc.size(0), Ac.size(0), scaling,
        static_cast<float>(p), p > 0 ? 1.0 / (1.0 - p) : 1.0, p > 0 ? rng : nullptr, to_dtype(xc.scalar_type())});
    return {dx, dA, dB};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("lora_linear", &lora::forward<CpuBackend>);
  m.impl("lora_linear_backward", &lora::backward<CpuBackend>);
}

}  // namespace pyfastpeft
