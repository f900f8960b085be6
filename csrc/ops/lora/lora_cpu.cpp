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

// float32 and float64 run the rank-r products in our register-tiled kernels where the CPU level has
// them (AVX2, AVX-512: see lora_kernels_cpu.cpp); the 16-bit types (which the kernels would have to
// widen) take the BLAS, except for the fused dropout kernels.
inline bool tiled(const at::Tensor& t) {
  return lora_cpu_kernels().tiled && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

struct CpuBackend {
  static at::Tensor shrink(const at::Tensor& x2, const at::Tensor& lora_A, double p, const int64_t* rng) {
    if (p == 0 && !tiled(x2)) return at::mm(x2, lora_A.t());
    const at::Tensor xc = x2.contiguous(), Ac = lora_A.contiguous();
    at::Tensor xa = at::empty({xc.size(0), Ac.size(0)}, xc.options());
    lora_cpu_kernels().shrink(LoraShrinkParams{xc.const_data_ptr(), Ac.const_data_ptr(), xa.mutable_data_ptr(),
                                               xc.size(0), xc.size(1), Ac.size(0), static_cast<float>(p),
                                               p > 0 ? 1.0 / (1.0 - p) : 1.0, p > 0 ? rng : nullptr,
                                               to_dtype(xc.scalar_type())});
    return xa;
  }

  // y = b + s·u·V with V [r, cols]: for the forward V = Bᵀ (copied to rows once: r·out elements).
  static void expand(at::Tensor& y, const at::Tensor& u, const at::Tensor& V, const std::optional<at::Tensor>& bias,
                     double s) {
    if (!tiled(y)) return lora::expand_blas(y, u, V, bias, s);
    const at::Tensor uc = u.contiguous(), Vc = V.contiguous();
    const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
    lora_cpu_kernels().expand(LoraExpandParams{uc.const_data_ptr(), Vc.const_data_ptr(),
                                               bias ? bc.const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                               uc.size(0), uc.size(1), Vc.size(1), s, false,
                                               to_dtype(y.scalar_type())});
  }

  // C = s·Uᵀ·X [r, cols]; C contiguous, or the transposed view of a contiguous [cols, r] (dB).
  static void outer(at::Tensor& C, const at::Tensor& U, const at::Tensor& X, double s) {
    if (!tiled(C)) return lora::outer_blas(C, U, X, s);
    const bool transposed = !C.is_contiguous();
    TORCH_INTERNAL_ASSERT(!transposed || C.t().is_contiguous());
    const at::Tensor Uc = U.contiguous(), Xc = X.contiguous();
    lora_cpu_kernels().outer(LoraOuterParams{Uc.const_data_ptr(), Xc.const_data_ptr(), C.mutable_data_ptr(),
                                             Xc.size(0), Uc.size(1), Xc.size(1), s, transposed,
                                             to_dtype(C.scalar_type())});
  }

  // y = s·x·M, M [cols, r] (u = s·dy·B).
  static void project(at::Tensor& y, const at::Tensor& x, const at::Tensor& M, double s) {
    if (!tiled(y)) return lora::project_blas(y, x, M, s);
    const at::Tensor xc = x.contiguous(), Mc = M.contiguous();
    lora_cpu_kernels().project(LoraProjectParams{xc.const_data_ptr(), Mc.const_data_ptr(), y.mutable_data_ptr(),
                                                 xc.size(0), xc.size(1), Mc.size(1), s,
                                                 to_dtype(y.scalar_type())});
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
