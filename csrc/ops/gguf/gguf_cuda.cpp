// CUDA glue of the gguf family: device guard, current stream, registration (checks in gguf_impl.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "gguf.h"
#include "gguf_impl.h"
#include "pyfastpeft/cuda_glue.h"

namespace pyfastpeft {
namespace {

struct CudaBackend {
  static void linear(const GGUFLinearParams& p) { launch("gguf_linear", [&] { gguf_linear_cuda(p, current_stream()); }); }
  static void linear_backward(const GGUFLinearBackwardParams& p) {
    launch("gguf_linear_backward", [&] { gguf_linear_backward_cuda(p, current_stream()); });
  }
  static void rows(const GGUFRowsParams& p) { launch("gguf_dequantize", [&] { gguf_rows_cuda(p, current_stream()); }); }
  static void quantize(const GGUFQuantizeParams& p) {
    launch("gguf_quantize", [&] { gguf_quantize_cuda(p, current_stream()); });
  }
};

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t cols,
                       const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(blocks.device());
  return gguf::linear<CudaBackend>(x, blocks, qtype, cols, bias);
}

at::Tensor linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& blocks, int64_t qtype, int64_t cols) {
  const c10::cuda::CUDAGuard guard(blocks.device());
  return gguf::linear_backward<CudaBackend>(grad_y, blocks, qtype, cols);
}

at::Tensor dequantize_cuda(const at::Tensor& blocks, int64_t qtype, int64_t cols, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(blocks.device());
  return gguf::dequantize<CudaBackend>(blocks, qtype, cols, dtype);
}

at::Tensor embedding_cuda(const at::Tensor& ids, const at::Tensor& blocks, int64_t qtype, int64_t cols,
                          at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(blocks.device());
  return gguf::embedding<CudaBackend>(ids, blocks, qtype, cols, dtype);
}

at::Tensor quantize_cuda(const at::Tensor& weight, int64_t qtype) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return gguf::quantize<CudaBackend>(weight, qtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CUDA, m) {
  m.impl("gguf_linear", &linear_cuda);
  m.impl("gguf_linear_backward", &linear_backward_cuda);
  m.impl("gguf_dequantize", &dequantize_cuda);
  m.impl("gguf_embedding", &embedding_cuda);
  m.impl("gguf_quantize", &quantize_cuda);
}

}  // namespace pyfastpeft
