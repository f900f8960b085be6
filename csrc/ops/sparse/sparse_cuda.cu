// CUDA kernels of the sparse family. Torch-free: they see params structs and a stream.
#include <algorithm>

#include "pyfastpeft/cuda_utils.cuh"
#include "sparse.h"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// dΔ_j = dyᵀ[r_j]·xᵀ[c_j] (sparse.h): one warp per index; the lanes stride along N, where both rows are
// contiguous, so every load is coalesced. Accumulates in float (double for float64).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) sampled_grad_kernel(SampledGradParams p) {
  using acc_t = typename Acc<T>::type;
  const T* gy_t = static_cast<const T*>(p.grad_y);
  const T* x_t = static_cast<const T*>(p.x);
  const I* idx = static_cast<const I*>(p.indices);
  T* out = static_cast<T*>(p.out);
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t numel = p.out_features * p.in_features;
  for (int64_t j = warp; j < p.k; j += n_warps) {
    const int64_t flat = static_cast<int64_t>(idx[j]);
    if (flat < 0 || flat >= numel) {  // never read out of bounds, whatever the caller checked
      if (lane == 0) store_from_acc(out + j, static_cast<acc_t>(NAN));
      continue;
    }
    const T* a = gy_t + (flat / p.in_features) * p.n_rows;
    const T* b = x_t + (flat % p.in_features) * p.n_rows;
    acc_t acc = 0;
    for (int64_t n = lane; n < p.n_rows; n += 32) acc += load_acc(a + n) * load_acc(b + n);
    for (int o = 16; o > 0; o /= 2) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) store_from_acc(out + j, acc);
  }
}

}  // namespace

void sampled_weight_grad_cuda(const SampledGradParams& params, cudaStream_t stream) {
  if (params.k == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(params.k, kWarps), 65535 * 32));
  if (params.indices_int32) {
    PFP_CUDA_DISPATCH(params.dtype, sampled_grad_kernel<scalar_t, int32_t><<<grid, kThreads, 0, stream>>>(params));
  } else {
    PFP_CUDA_DISPATCH(params.dtype, sampled_grad_kernel<scalar_t, int64_t><<<grid, kThreads, 0, stream>>>(params));
  }
  cuda::check_launch("sampled_grad_kernel");
}

}  // namespace pyfastpeft
