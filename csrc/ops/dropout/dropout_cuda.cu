// CUDA kernel of the dropout family (semantics in pyfastpeft/dropout.h). Torch-free: params + stream.
#include <algorithm>

#include "pyfastpeft/cuda_utils.cuh"
#include "pyfastpeft/dropout.h"
#include "pyfastpeft/philox.h"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

// One thread per Philox block (8 mask elements, 16 apart; see philox.h): out0 = in0 ⊙ mask·scale, and
// the pair (in1 → out1). 16 consecutive threads write 16 consecutive elements.
template <typename T>
__global__ void dropout_apply_kernel(DropoutParams p) {
  using acc_t = typename Acc<T>::type;
  const uint64_t seed = static_cast<uint64_t>(p.rng_state[0]);
  const uint64_t offset = static_cast<uint64_t>(p.rng_state[1]);
  const uint32_t threshold = dropout_threshold(p.p);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const T* in0 = static_cast<const T*>(p.in0);
  const T* in1 = static_cast<const T*>(p.in1);
  T* out0 = static_cast<T*>(p.out0);
  T* out1 = static_cast<T*>(p.out1);
  const int64_t n_blocks = cuda::ceil_div(p.numel, kDropoutGroup) * kDropoutGroupBlocks;
  for (int64_t block = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; block < n_blocks;
       block += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 words = philox4x32_10(static_cast<uint64_t>(block), offset, seed);
    const int64_t e0 = (block / kDropoutGroupBlocks) * kDropoutGroup + block % kDropoutGroupBlocks;
#pragma unroll
    for (int lane = 0; lane < 8; ++lane) {
      const int64_t e = e0 + 16 * lane;
      if (e < p.numel) {
        const acc_t keep = philox_lane16(words, lane) >= threshold ? scale : acc_t(0);
        store_from_acc(out0 + e, load_acc(in0 + e) * keep);
        if (in1 != nullptr) store_from_acc(out1 + e, load_acc(in1 + e) * keep);
      }
    }
  }
}

}  // namespace

void dropout_apply_cuda(const DropoutParams& params, cudaStream_t stream) {
  const int64_t n_blocks = cuda::ceil_div(params.numel, kDropoutGroup) * kDropoutGroupBlocks;
  if (n_blocks == 0) return;
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(n_blocks, threads), 65535 * 8));
  PFP_CUDA_DISPATCH(params.dtype, dropout_apply_kernel<scalar_t><<<grid, threads, 0, stream>>>(params));
  cuda::check_launch("dropout_apply_kernel");
}

}  // namespace pyfastpeft
