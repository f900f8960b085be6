// CPU glue of the gguf family: checks, allocation and registration. The kernels
// (gguf_kernels_cpu.cpp, compiled once per CPU capability level) run through gguf_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "gguf.h"
#include "gguf_impl.h"
#include "gguf_kernels_cpu_table.h"

namespace pyfastpeft {
namespace {

struct CpuBackend {
  static void linear(const GGUFLinearParams& p) { gguf_cpu_kernels().linear(p); }
  static void linear_backward(const GGUFLinearBackwardParams& p) { gguf_cpu_kernels().linear_backward(p); }
  static void rows(const GGUFRowsParams& p) { gguf_cpu_kernels().rows(p); }
  static void quantize(const GGUFQuantizeParams& p) { gguf_cpu_kernels().quantize(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("gguf_linear", &gguf::linear<CpuBackend>);
  m.impl("gguf_linear_backward", &gguf::linear_backward<CpuBackend>);
  m.impl("gguf_dequantize", &gguf::dequantize<CpuBackend>);
  m.impl("gguf_embedding", &gguf::embedding<CpuBackend>);
  m.impl("gguf_quantize", &gguf::quantize<CpuBackend>);
}

}  // namespace pyfastpeft
