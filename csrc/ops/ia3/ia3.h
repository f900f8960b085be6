// (IA)³ feature scaling: y[n, j] = x[n, j]·l[j] for a vector l over the last dimension.
//
// Used on the input of a feed-forward linear (x is the layer input) or on the output of a key/value
// linear (x is W·x' + b). The backward needs x and l:
//   dx[n, j] = dy[n, j]·l[j]
//   dl[j]    = Σ_n dy[n, j]·x[n, j]          (float accumulation; fixed summation order)
// and makes both in one pass over dy and x (autograd's mul backward makes dy·l, then dy·x as a full-size
// temporary, then its column sum). This header holds the torch-free interface the CUDA backend launches.
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

struct Ia3ScaleBackwardParams {
  const void* grad_y;  // [n_rows, n_cols], unit column stride, row stride grad_row_stride (elements)
  const void* x;       // [n_rows, n_cols], unit column stride, row stride x_row_stride
  const void* scale;   // [n_cols], contiguous
  void* dx;            // [n_rows, n_cols], contiguous; unused when !need_dx
  void* partial;       // [n_chunks, n_cols] accumulation type (float; double for float64); unused when !need_dscale
  void* dscale;        // [n_cols], contiguous; unused when !need_dscale
  int64_t n_rows, n_cols, grad_row_stride, x_row_stride;
  int64_t rows_per_chunk, n_chunks;  // rows are summed per chunk into partial, then chunks in order
  bool need_dx, need_dscale;
  DType dtype;
};

// Row chunking of the dl reduction for the CUDA kernel: enough chunks to fill the GPU, at most 65535.
inline int64_t ia3_rows_per_chunk(int64_t n_rows) {
  int64_t rows = 256;
  while ((n_rows + rows - 1) / rows > 65535) rows *= 2;
  return rows;
}

void ia3_scale_backward_cuda(const Ia3ScaleBackwardParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
