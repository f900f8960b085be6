// CPU glue of the quant family: allocation and registration. The kernels (quant_kernels_cpu.cpp,
// compiled once per CPU capability level) run through quant_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "quant.h"
#include "quant_impl.h"
#include "quant_kernels_cpu_table.h"

namespace pyfastpeft {
namespace {

struct CpuBackend {
  static void fake_quantize(const FakeQuantParams& p) { quant_cpu_kernels().fake_quantize(p); }
  static void apply(const FakeQuantApplyParams& p) { quant_cpu_kernels().apply(p); }
  static void backward(const FakeQuantBackwardParams& p) { quant_cpu_kernels().backward(p); }
  static std::tuple<at::Tensor, at::Tensor> lsq_backward(LsqBackwardParams& p, const at::Tensor& scale, bool has_zp) {
    at::Tensor dscale = at::empty({p.layout.channels}, scale.options());
    at::Tensor dzero = at::empty({has_zp ? p.layout.channels : 0}, scale.options());
    p.grad_scale = dscale.mutable_data_ptr();
    p.grad_zero_point = has_zp ? dzero.mutable_data_ptr() : nullptr;
    quant_cpu_kernels().lsq_backward(p);
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
