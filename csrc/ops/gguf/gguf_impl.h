// The gguf ops' argument checks and tensor plumbing, shared by the CPU and CUDA registrations.
// `Backend` supplies the device kernels:
//   static void linear(const GGUFLinearParams&);
//   static void linear_backward(const GGUFLinearBackwardParams&);
//   static void rows(const GGUFRowsParams&);
//   static void quantize(const GGUFQuantizeParams&);
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <vector>

#include "gguf.h"
#include "pyfastpeft/checks.h"

namespace pyfastpeft::gguf {

inline const char* qtype_name(int64_t qtype) {
  return qtype == kGGUFQ4_0 ? "Q4_0" : qtype == kGGUFQ4_1 ? "Q4_1" : "Q8_0";
}

inline void check_qtype(int64_t qtype) {
  TORCH_CHECK_VALUE(gguf_block_bytes(qtype) != 0, "qtype: expected a GGML block type 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got ",
                    qtype);
}

inline void check_cols(int64_t cols) {
  TORCH_CHECK_VALUE(cols >= 0 && cols % kGGUFBlock == 0,
                    "cols: expected a non-negative multiple of 32 (the weights per block), got ", cols);
}

inline int64_t row_bytes(int64_t qtype, int64_t cols) { return cols / kGGUFBlock * gguf_block_bytes(qtype); }

// blocks: uint8 [rows, cols / 32 · block_bytes]; returns it contiguous.
inline at::Tensor checked_blocks(const at::Tensor& blocks, int64_t qtype, int64_t cols) {
  check_qtype(qtype);
  check_cols(cols);
  TORCH_CHECK_VALUE(blocks.scalar_type() == at::kByte, "blocks: expected a uint8 tensor of GGUF block bytes, got ",
                    blocks.scalar_type());
  check_dim(blocks, "blocks", 2);
  const int64_t bytes = row_bytes(qtype, cols);
  TORCH_CHECK_VALUE(blocks.size(1) == bytes, "blocks: expected ", bytes, " bytes per row (", cols / kGGUFBlock,
                    " blocks of ", gguf_block_bytes(qtype), " bytes: ", qtype_name(qtype), " with cols=", cols,
                    "), got shape ", blocks.sizes());
  return blocks.contiguous();
}

inline std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

template <class Backend>
at::Tensor linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t cols,
                  const std::optional<at::Tensor>& bias) {
  const at::Tensor b = checked_blocks(blocks, qtype, cols);
  check_float(x, "x");
  check_min_dim(x, "x", 1);
  check_size(x, "x", x.dim() - 1, cols, "cols, the weight's in_features");
  check_same_device(blocks, "blocks", x, "x");
  const int64_t rows = b.size(0);
  check_bias(bias, rows, x);
  const at::Tensor x2 = as_rows(x).contiguous();
  at::Tensor y = at::empty({x2.size(0), rows}, x2.options());
  if (y.numel() > 0) {
    std::optional<at::Tensor> bc;
    if (bias) bc = bias->contiguous();
    Backend::linear({x2.const_data_ptr(), b.const_data_ptr<uint8_t>(), bc ? bc->const_data_ptr() : nullptr,
                     y.mutable_data_ptr(), x2.size(0), rows, cols, static_cast<int>(qtype), to_dtype(x.scalar_type())});
  }
  return y.view(with_last(x, rows));
}

template <class Backend>
at::Tensor linear_backward(const at::Tensor& grad_y, const at::Tensor& blocks, int64_t qtype, int64_t cols) {
  const at::Tensor b = checked_blocks(blocks, qtype, cols);
  check_float(grad_y, "grad_y");
  check_min_dim(grad_y, "grad_y", 1);
  check_size(grad_y, "grad_y", grad_y.dim() - 1, b.size(0), "rows, the weight's out_features");
  check_same_device(blocks, "blocks", grad_y, "grad_y");
  const at::Tensor g2 = as_rows(grad_y).contiguous();
  at::Tensor dx = at::empty({g2.size(0), cols}, g2.options());
  if (dx.numel() > 0) {
    Backend::linear_backward({g2.const_data_ptr(), b.const_data_ptr<uint8_t>(), dx.mutable_data_ptr(), g2.size(0),
                              b.size(0), cols, static_cast<int>(qtype), to_dtype(grad_y.scalar_type())});
  }
  return dx.view(with_last(grad_y, cols));
}

inline void check_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK_VALUE(is_float_dtype(dtype), "dtype: expected float64, float32, bfloat16 or float16, got ", dtype);
}

template <class Backend>
at::Tensor dequantize(const at::Tensor& blocks, int64_t qtype, int64_t cols, at::ScalarType dtype) {
  const at::Tensor b = checked_blocks(blocks, qtype, cols);
  check_out_dtype(dtype);
  at::Tensor out = at::empty({b.size(0), cols}, b.options().dtype(dtype));
  if (out.numel() > 0) {
    Backend::rows({nullptr, b.const_data_ptr<uint8_t>(), out.mutable_data_ptr(), b.size(0), b.size(0), cols,
                   static_cast<int>(qtype), to_dtype(dtype)});
  }
  return out;
}

template <class Backend>
at::Tensor embedding(const at::Tensor& ids, const at::Tensor& blocks, int64_t qtype, int64_t cols,
                     at::ScalarType dtype) {
  const at::Tensor b = checked_blocks(blocks, qtype, cols);
  check_out_dtype(dtype);
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                    "ids: expected an int64 or int32 tensor of row indices, got ", ids.scalar_type());
  check_same_device(blocks, "blocks", ids, "ids");
  const at::Tensor ic = ids.to(at::kLong).contiguous();
  const int64_t rows = b.size(0);
  if (ic.numel() > 0) {
    const auto [lo, hi] = at::aminmax(ic);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < rows, "ids: expected indices in [0, ", rows, ") (the rows of blocks), got ",
                      lo_v < 0 ? lo_v : hi_v);
  }
  std::vector<int64_t> shape(ic.sizes().begin(), ic.sizes().end());
  shape.push_back(cols);
  at::Tensor out = at::empty(shape, b.options().dtype(dtype));
  if (out.numel() > 0) {
    Backend::rows({ic.const_data_ptr<int64_t>(), b.const_data_ptr<uint8_t>(), out.mutable_data_ptr(), ic.numel(), rows,
                   cols, static_cast<int>(qtype), to_dtype(dtype)});
  }
  return out;
}

template <class Backend>
at::Tensor quantize(const at::Tensor& weight, int64_t qtype) {
  check_qtype(qtype);
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  TORCH_CHECK_VALUE(weight.size(1) % kGGUFBlock == 0, "weight: expected a number of columns that is a multiple of 32 ",
                    "(the weights per block), got shape ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t cols = w.size(1);
  at::Tensor out = at::empty({w.size(0), row_bytes(qtype, cols)}, w.options().dtype(at::kByte));
  if (out.numel() > 0) {
    Backend::quantize({w.const_data_ptr(), out.mutable_data_ptr<uint8_t>(), w.size(0), cols, static_cast<int>(qtype),
                       to_dtype(w.scalar_type())});
  }
  return out;
}

}  // namespace pyfastpeft::gguf
