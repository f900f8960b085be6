// CPU kernels of the quant family (quant_kernels_cpu.h) and their registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "quant.h"
#include "quant_impl.h"
#include "quant_kernels_cpu.h"

namespace pyfastpeft {
namespace {

template <template <typename> class Kernel, class Params>
void run(const Params& p) {
  switch (p.dtype) {
    case DType::Float64: return Kernel<double>::run(p);
    case DType::Float32: return Kernel<float>::run(p);
    case DType::BFloat16: return Kernel<at::BFloat16>::run(p);
    case DType::Float16: return Kernel<at::Half>::run(p);
  }
}

template <typename T>
struct FakeQuantizeKernel {
  static void run(const FakeQuantParams& p) { quant_cpu::fake_quantize<T>(p); }
};
template <typename T>
struct ApplyKernel {
  static void run(const FakeQuantApplyParams& p) {
    quant_cpu::apply<T>(static_cast<const T*>(p.x), static_cast<T*>(p.out), static_cast<const acc_type<T>*>(p.scale),
                        p.zero_point, p.layout, p.qmin, p.qmax);
  }
};
template <typename T>
struct BackwardKernel {
  static void run(const FakeQuantBackwardParams& p) { quant_cpu::fake_quantize_backward<T>(p); }
};
template <typename T>
struct LsqBackwardKernel {
  static void run(const LsqBackwardParams& p) { quant_cpu::lsq_backward<T>(p); }
};

struct CpuBackend {
  static void fake_quantize(const FakeQuantParams& p) { run<FakeQuantizeKernel>(p); }
  static void apply(const FakeQuantApplyParams& p) { run<ApplyKernel>(p); }
  static void backward(const FakeQuantBackwardParams& p) { run<BackwardKernel>(p); }
  static std::tuple<at::Tensor, at::Tensor> lsq_backward(LsqBackwardParams& p, const at::Tensor& scale, bool has_zp) {
    at::Tensor dscale = at::empty({p.layout.channels}, scale.options());
    at::Tensor dzero = at::empty({has_zp ? p.layout.channels : 0}, scale.options());
    p.grad_scale = dscale.mutable_data_ptr();
    p.grad_zero_point = has_zp ? dzero.mutable_data_ptr() : nullptr;
    run<LsqBackwardKernel>(p);
    return {dscale, dzero};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("fake_quantize", &quant::fake_quantize<CpuBackend>);
  m.impl("fake_quantize_backward", &quant::fake_quantize_backward<CpuBackend>);
  m.impl("fake_quantize_lsq", &quant::fake_quantize_lsq<CpuBackend>);
  m.impl("fake_quantize_lsq_backward", &quant::fake_quantize_lsq_backward<CpuBackend>);
}

}  // namespace pyfastpeft
