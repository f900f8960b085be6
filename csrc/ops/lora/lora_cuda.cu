// CUDA kernels of the LoRA family. Torch-free: they see params structs and a stream.
#include "lora.h"
#include "pyfastpeft/cuda_utils.cuh"
#include "pyfastpeft/philox.h"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

// xa[n, j] = Σ_k drop(x)[n, k]·A[j, k]. A block computes a ROWS × RANK_TILE tile of xa, streaming
// K_TILE-wide slabs of x (dropout applied on load, never written back) and of A through shared memory.
constexpr int kShrinkRows = 16;
constexpr int kShrinkRankTile = 32;
constexpr int kShrinkKTile = 64;
constexpr int kShrinkThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(LoraShrinkParams p) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t x_tile[kShrinkRows][kShrinkKTile + 1];
  __shared__ acc_t a_tile[kShrinkRankTile][kShrinkKTile + 1];
  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A);
  T* xa = static_cast<T*>(p.xa);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kShrinkRankTile;
  const bool use_dropout = p.rng_state != nullptr;
  const uint64_t seed = use_dropout ? static_cast<uint64_t>(p.rng_state[0]) : 0;
  const uint64_t offset = use_dropout ? static_cast<uint64_t>(p.rng_state[1]) : 0;
  const uint32_t threshold = dropout_threshold(p.p);
  const acc_t scale = static_cast<acc_t>(p.scale);

  // Each thread owns two outputs of the 16 × 32 tile: (row, j) and (row + 8, j).
  const int j_local = threadIdx.x % kShrinkRankTile;
  const int row_local = threadIdx.x / kShrinkRankTile;  // 0..7
  acc_t acc0 = 0, acc1 = 0;
  for (int64_t k0 = 0; k0 < p.in_features; k0 += kShrinkKTile) {
    for (int i = threadIdx.x; i < kShrinkRows * kShrinkKTile; i += kShrinkThreads) {
      const int r = i / kShrinkKTile, c = i % kShrinkKTile;
      const int64_t row = row0 + r, k = k0 + c;
      acc_t v = 0;
      if (row < p.n_rows && k < p.in_features) {
        const int64_t e = row * p.in_features + k;
        v = load_acc(x + e);
        if (use_dropout) v = dropout_keep(seed, offset, e, threshold) ? v * scale : acc_t(0);
      }
      x_tile[r][c] = v;
    }
    for (int i = threadIdx.x; i < kShrinkRankTile * kShrinkKTile; i += kShrinkThreads) {
      const int r = i / kShrinkKTile, c = i % kShrinkKTile;
      const int64_t j = j0 + r, k = k0 + c;
      a_tile[r][c] = (j < p.rank && k < p.in_features) ? load_acc(A + j * p.in_features + k) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kShrinkKTile; ++c) {
      const acc_t a = a_tile[j_local][c];
      acc0 += x_tile[row_local][c] * a;
      acc1 += x_tile[row_local + 8][c] * a;
    }
    __syncthreads();
  }
  const int64_t j = j0 + j_local;
  if (j < p.rank) {
    if (row0 + row_local < p.n_rows) store_from_acc(xa + (row0 + row_local) * p.rank + j, acc0);
    if (row0 + row_local + 8 < p.n_rows) store_from_acc(xa + (row0 + row_local + 8) * p.rank + j, acc1);
  }
}

}  // namespace

void lora_shrink_cuda(const LoraShrinkParams& params, cudaStream_t stream) {
  if (params.n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(params.n_rows, kShrinkRows)),
                  static_cast<unsigned>(cuda::ceil_div(params.rank, kShrinkRankTile)));
  PFP_CUDA_DISPATCH(params.dtype, lora_shrink_kernel<scalar_t><<<grid, kShrinkThreads, 0, stream>>>(params));
  cuda::check_launch("lora_shrink_kernel");
}

}  // namespace pyfastpeft
