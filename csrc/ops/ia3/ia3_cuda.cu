// CUDA kernels of the ia3 family (ia3.h). Torch-free: they see a params struct and a stream.
#include <algorithm>

#include "ia3.h"
#include "pyfastpeft/cuda_utils.cuh"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kCols = 32;  // columns per block: one warp reads 32 consecutive elements of a row
constexpr int kRowLanes = 8;

// Block (kCols, kRowLanes) at (blockIdx.x, blockIdx.y) owns kCols columns of one chunk of rows_per_chunk
// rows. Thread (c, r) walks rows r, r + kRowLanes, ... of the chunk: dx[n, j] = dy[n, j]·l[j] and
// acc += dy[n, j]·x[n, j]; the kRowLanes partials are added in shared memory in a fixed order into
// partial[chunk, j]. No atomics: the result is deterministic.
template <typename T>
__global__ void __launch_bounds__(kCols* kRowLanes) scale_backward_kernel(Ia3ScaleBackwardParams p) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t lanes[kRowLanes][kCols];
  const T* dy = static_cast<const T*>(p.grad_y);
  const T* x = static_cast<const T*>(p.x);
  const T* l = static_cast<const T*>(p.scale);
  T* dx = static_cast<T*>(p.dx);
  acc_t* partial = static_cast<acc_t*>(p.partial);
  const int c = threadIdx.x, r = threadIdx.y;
  for (int64_t chunk = blockIdx.y; chunk < p.n_chunks; chunk += gridDim.y) {
    const int64_t row0 = chunk * p.rows_per_chunk;
    const int64_t row1 = row0 + p.rows_per_chunk < p.n_rows ? row0 + p.rows_per_chunk : p.n_rows;
    for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * kCols; col0 < p.n_cols;
         col0 += static_cast<int64_t>(gridDim.x) * kCols) {
      const int64_t col = col0 + c;
      acc_t acc = 0;
      if (col < p.n_cols) {
        const acc_t scale = load_acc(l + col);
        for (int64_t n = row0 + r; n < row1; n += kRowLanes) {
          const acc_t g = load_acc(dy + n * p.grad_row_stride + col);
          if (p.need_dx) store_from_acc(dx + n * p.n_cols + col, g * scale);
          if (p.need_dscale) acc += g * load_acc(x + n * p.x_row_stride + col);
        }
      }
      if (p.need_dscale) {
        lanes[r][c] = acc;
        __syncthreads();
        if (r == 0 && col < p.n_cols) {
          acc_t total = 0;
          for (int i = 0; i < kRowLanes; ++i) total += lanes[i][c];
          partial[chunk * p.n_cols + col] = total;
        }
        __syncthreads();
      }
    }
  }
}

// dl[j] = Σ_chunk partial[chunk, j], chunks in order (zero when there are no rows: n_chunks = 0).
template <typename T>
__global__ void sum_chunks_kernel(Ia3ScaleBackwardParams p) {
  using acc_t = typename Acc<T>::type;
  const acc_t* partial = static_cast<const acc_t*>(p.partial);
  T* dl = static_cast<T*>(p.dscale);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.n_cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    for (int64_t chunk = 0; chunk < p.n_chunks; ++chunk) total += partial[chunk * p.n_cols + j];
    store_from_acc(dl + j, total);
  }
}

}  // namespace

void ia3_scale_backward_cuda(const Ia3ScaleBackwardParams& params, cudaStream_t stream) {
  if (params.n_cols == 0 || !(params.need_dx || params.need_dscale)) return;
  const unsigned sum_blocks = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(params.n_cols, 256), 65535));
  if (params.n_rows == 0) {
    // No rows: dx is empty, and dscale is a sum over nothing, written as zeros (as on the CPU).
    if (params.need_dscale) {
      Ia3ScaleBackwardParams none = params;
      none.n_chunks = 0;
      PFP_CUDA_DISPATCH(params.dtype, sum_chunks_kernel<scalar_t><<<sum_blocks, 256, 0, stream>>>(none));
      cuda::check_launch("ia3 sum_chunks_kernel");
    }
    return;
  }
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(params.n_cols, kCols), 65535)),
                  static_cast<unsigned>(std::min<int64_t>(params.n_chunks, 65535)));
  const dim3 block(kCols, kRowLanes);
  PFP_CUDA_DISPATCH(params.dtype, scale_backward_kernel<scalar_t><<<grid, block, 0, stream>>>(params));
  cuda::check_launch("ia3 scale_backward_kernel");
  if (params.need_dscale) {
    PFP_CUDA_DISPATCH(params.dtype, sum_chunks_kernel<scalar_t><<<sum_blocks, 256, 0, stream>>>(params));
    cuda::check_launch("ia3 sum_chunks_kernel");
  }
}

}  // namespace pyfastpeft
