// BitFit linear: y = x·Wᵀ + b with W frozen, only b trained.
//
// The backward needs only W and dy:
//   dx[n, :] = Σ_o dy[n, o]·W[o, :]          (ATen BLAS)
//   db[o]    = Σ_n dy[n, o]                  (the column sum below; float accumulation for 16-bit types)
// so the forward saves no input activation at all. This header holds the torch-free column-sum kernel
// interface the CUDA backend launches.
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

struct ColumnSumParams {
  const void* grad_y;  // [n_rows, n_cols], unit column stride, row stride row_stride (elements)
  void* out;           // [n_cols], contiguous, dtype of grad_y
  int64_t n_rows, n_cols, row_stride;
  DType dtype;
};

// out[o] = Σ_n grad_y[n, o], in a fixed order (deterministic).
void column_sum_cuda(const ColumnSumParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
