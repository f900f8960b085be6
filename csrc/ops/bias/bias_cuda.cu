// CUDA kernels of the bias family. Torch-free: they see a params struct and a stream.
#include <algorithm>

#include "bias.h"
#include "pyfastpeft/cuda_utils.cuh"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kCols = 32;  // columns per block: one warp reads 32 consecutive elements of a row
constexpr int kRowLanes = 8;

// out[o] = Σ_n dy[n, o] (bias.h). Block (kCols, kRowLanes) owns kCols columns; thread (c, r) sums rows
// r, r + kRowLanes, ... of column c in float (double for float64), then the kRowLanes partials are added
// in shared memory in a fixed order: no atomics, so the result is deterministic.
template <typename T>
__global__ void __launch_bounds__(kCols* kRowLanes) column_sum_kernel(ColumnSumParams p) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t partial[kRowLanes][kCols];
  const T* dy = static_cast<const T*>(p.grad_y);
  T* out = static_cast<T*>(p.out);
  const int c = threadIdx.x, r = threadIdx.y;
  for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * kCols; col0 < p.n_cols;
       col0 += static_cast<int64_t>(gridDim.x) * kCols) {
    const int64_t col = col0 + c;
    acc_t acc = 0;
    if (col < p.n_cols) {
      for (int64_t n = r; n < p.n_rows; n += kRowLanes) acc += load_acc(dy + n * p.row_stride + col);
    }
    partial[r][c] = acc;
    __syncthreads();
    if (r == 0 && col < p.n_cols) {
      acc_t total = 0;
      for (int i = 0; i < kRowLanes; ++i) total += partial[i][c];
      store_from_acc(out + col, total);
    }
    __syncthreads();
  }
}

}  // namespace

void column_sum_cuda(const ColumnSumParams& params, cudaStream_t stream) {
  if (params.n_cols == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(params.n_cols, kCols), 65535));
  const dim3 block(kCols, kRowLanes);
  PFP_CUDA_DISPATCH(params.dtype, column_sum_kernel<scalar_t><<<grid, block, 0, stream>>>(params));
  cuda::check_launch("column_sum_kernel");
}

}  // namespace pyfastpeft
