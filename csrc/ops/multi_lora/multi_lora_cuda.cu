// CUDA kernels of the multi-adapter LoRA family (semantics in multi_lora.h). Torch-free: params + stream.
//
// Nothing here waits on the host: the forward gathers each token's adapter inside the shrink and
// expand kernels (the punica "bgmv" scheme), and the backward groups tokens with a device-side
// counting sort before the per-adapter weight-gradient reduction.
#include "multi_lora.h"
#include "pyfastpeft/cuda_utils.cuh"
#include "pyfastpeft/philox.h"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr unsigned kFullMask = 0xffffffffu;

// a(n), with anything outside [-1, K) read as -1 so that no kernel indexes past the adapters.
__device__ __forceinline__ int64_t adapter_of(const AdapterIndices& idx, int64_t n) {
  const int64_t k = idx.is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(idx.data)[n])
                                 : static_cast<const int64_t*>(idx.data)[n];
  return (k >= 0 && k < idx.num_adapters) ? k : -1;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Shrink: one warp per token and kShrinkRankTile outputs. Lanes stride over the contraction axis, so
// the input row is read once per rank tile (dropout applied on load) and each adapter row coalesced
// when stride_c = 1; a warp reduction finishes each output.
constexpr int kShrinkWarps = 8;
constexpr int kShrinkRankTile = 16;

template <typename T>
__global__ void __launch_bounds__(kShrinkWarps * 32) multi_lora_shrink_kernel(MultiLoraShrinkParams p) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kShrinkWarps + threadIdx.x / 32;
  if (n >= p.n_rows) return;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kShrinkRankTile;
  const int jn = static_cast<int>(p.rank - j0 < kShrinkRankTile ? p.rank - j0 : kShrinkRankTile);
  acc_t* out = static_cast<acc_t*>(p.out) + n * p.rank + j0;
  const int64_t k = adapter_of(p.indices, n);
  if (k < 0) {
    if (lane < jn) out[lane] = acc_t(0);
    return;
  }
  const T* in = static_cast<const T*>(p.in) + n * p.cols;
  const T* M = static_cast<const T*>(p.M) + k * p.stride_adapter + j0 * p.stride_j;
  const bool use_dropout = p.rng_state != nullptr;
  const uint64_t seed = use_dropout ? static_cast<uint64_t>(p.rng_state[0]) : 0;
  const uint64_t offset = use_dropout ? static_cast<uint64_t>(p.rng_state[1]) : 0;
  const uint32_t threshold = dropout_threshold(p.p);
  const acc_t scale = static_cast<acc_t>(p.dropout_scale);

  acc_t acc[kShrinkRankTile];
#pragma unroll
  for (int j = 0; j < kShrinkRankTile; ++j) acc[j] = acc_t(0);
  for (int64_t c = lane; c < p.cols; c += 32) {
    acc_t v = load_acc(in + c);
    if (use_dropout) v = dropout_keep(seed, offset, n * p.cols + c, threshold) ? v * scale : acc_t(0);
#pragma unroll
    for (int j = 0; j < kShrinkRankTile; ++j) {
      if (j < jn) acc[j] += v * load_acc(M + j * p.stride_j + c * p.stride_c);
    }
  }
  const acc_t s = p.scalings != nullptr ? static_cast<acc_t>(p.scalings[k]) : acc_t(1);
#pragma unroll
  for (int j = 0; j < kShrinkRankTile; ++j) {
    const acc_t total = warp_sum(acc[j]);
    if (lane == 0 && j < jn) out[j] = total * s;
  }
}

// Expand: one thread per output element (n, o); the rank-r row of `in` is shared by a warp's
// threads through the cache, and M's row o of the token's adapter is read contiguously when stride_j = 1.
template <typename T>
__global__ void multi_lora_expand_kernel(MultiLoraExpandParams p) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = p.n_rows * p.out_cols;
  const acc_t* in = static_cast<const acc_t*>(p.in);
  const T* M = static_cast<const T*>(p.M);
  T* out = static_cast<T*>(p.out);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / p.out_cols, o = e % p.out_cols;
    const int64_t k = adapter_of(p.indices, n);
    acc_t v = 0;
    if (k >= 0) {
      const acc_t* row = in + n * p.rank;
      const T* m = M + k * p.stride_adapter + o * p.stride_o;
      for (int64_t j = 0; j < p.rank; ++j) v += row[j] * load_acc(m + j * p.stride_j);
      if (p.scalings != nullptr) v *= static_cast<acc_t>(p.scalings[k]);
    }
    if (p.accumulate) v += load_acc(out + e);
    store_from_acc(out + e, v);
  }
}

// Counting sort in one block: shared-memory histogram, a prefix sum, then warp 0 places the tokens
// 32 at a time in token order (__match_any_sync finds the lanes sharing an adapter), so the order
// inside each adapter's segment, and every sum over it, is deterministic.
constexpr int kGroupThreads = 1024;

__global__ void __launch_bounds__(kGroupThreads) multi_lora_group_kernel(MultiLoraGroupParams p) {
  extern __shared__ unsigned long long cursor[];  // [K + 1]
  const int64_t K = p.indices.num_adapters;
  for (int64_t i = threadIdx.x; i <= K; i += blockDim.x) cursor[i] = 0;
  __syncthreads();
  for (int64_t n = threadIdx.x; n < p.n_rows; n += blockDim.x) {
    const int64_t k = adapter_of(p.indices, n);
    if (k >= 0) atomicAdd(&cursor[k + 1], 1ull);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t k = 1; k <= K; ++k) cursor[k] += cursor[k - 1];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i <= K; i += blockDim.x) p.offsets[i] = static_cast<int64_t>(cursor[i]);
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  for (int64_t base = 0; base < p.n_rows; base += 32) {
    const int64_t n = base + lane;
    const int64_t k = n < p.n_rows ? adapter_of(p.indices, n) : -1;
    const unsigned peers = __match_any_sync(kFullMask, static_cast<unsigned long long>(k));
    const int leader = __ffs(peers) - 1;
    const int rank_in_group = __popc(peers & ((1u << lane) - 1u));
    unsigned long long start = (lane == leader && k >= 0) ? cursor[k] : 0ull;
    start = __shfl_sync(kFullMask, start, leader);
    if (k >= 0) p.sorted_tokens[start + rank_in_group] = n;
    __syncwarp();
    if (lane == leader && k >= 0) cursor[k] = start + __popc(peers);
    __syncwarp();
  }
}

// Weight gradient: a block owns a kTile × kTile tile of G[k] and walks the adapter's tokens kTile at
// a time, staging P and Q rows in shared memory; each thread accumulates kTile / 8 outputs.
constexpr int kTile = 32;
constexpr int kGradThreads = 256;

template <typename TP, typename TQ, typename TG>
__global__ void __launch_bounds__(kGradThreads) multi_lora_weight_grad_kernel(MultiLoraWeightGradParams p) {
  using acc_t = typename Acc<TG>::type;
  __shared__ acc_t p_tile[kTile][kTile + 1];
  __shared__ acc_t q_tile[kTile][kTile + 1];
  const TP* P = static_cast<const TP*>(p.P);
  const TQ* Q = static_cast<const TQ*>(p.Q);
  const int64_t k = blockIdx.z;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTile, q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t begin = p.offsets[k], end = p.offsets[k + 1];
  const bool use_dropout = p.rng_state != nullptr;
  const uint64_t seed = use_dropout ? static_cast<uint64_t>(p.rng_state[0]) : 0;
  const uint64_t offset = use_dropout ? static_cast<uint64_t>(p.rng_state[1]) : 0;
  const uint32_t threshold = dropout_threshold(p.p);
  const acc_t scale = static_cast<acc_t>(p.dropout_scale);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;  // ty in [0, 8)
  constexpr int kPerThread = kTile / (kGradThreads / kTile);
  acc_t acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = acc_t(0);

  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    for (int i = threadIdx.x; i < kTile * kTile; i += kGradThreads) {
      const int row = i / kTile, col = i % kTile;
      const int64_t t = t0 + row;
      acc_t pv = 0, qv = 0;
      if (t < end) {
        const int64_t n = p.sorted_tokens[t];
        if (p0 + col < p.p_dim) pv = load_acc(P + n * p.p_dim + p0 + col);
        if (q0 + col < p.q_dim) {
          const int64_t e = n * p.q_dim + q0 + col;
          qv = load_acc(Q + e);
          if (use_dropout) qv = dropout_keep(seed, offset, e, threshold) ? qv * scale : acc_t(0);
        }
      }
      p_tile[row][col] = pv;
      q_tile[row][col] = qv;
    }
    __syncthreads();
#pragma unroll 8
    for (int row = 0; row < kTile; ++row) {
      const acc_t qv = q_tile[row][tx];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) acc[i] += p_tile[row][ty + 8 * i] * qv;
    }
    __syncthreads();
  }
  const acc_t s = p.scalings != nullptr ? static_cast<acc_t>(p.scalings[k]) : acc_t(1);
  TG* G = static_cast<TG*>(p.G) + k * p.p_dim * p.q_dim;
  const int64_t q = q0 + tx;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = p0 + ty + 8 * i;
    if (row < p.p_dim && q < p.q_dim) store_from_acc(G + row * p.q_dim + q, acc[i] * s);
  }
}

template <typename T>
void launch_weight_grad(const MultiLoraWeightGradParams& params, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(params.q_dim, kTile)),
                  static_cast<unsigned>(cuda::ceil_div(params.p_dim, kTile)), static_cast<unsigned>(params.num_adapters));
  if (params.p_is_acc && !params.q_is_acc) {
    multi_lora_weight_grad_kernel<acc_t, T, T><<<grid, kGradThreads, 0, stream>>>(params);
  } else if (!params.p_is_acc && params.q_is_acc) {
    multi_lora_weight_grad_kernel<T, acc_t, T><<<grid, kGradThreads, 0, stream>>>(params);
  } else {
    throw std::runtime_error("multi_lora_weight_grad: exactly one of P and Q must be in the accumulation type");
  }
}

}  // namespace

void multi_lora_shrink_cuda(const MultiLoraShrinkParams& params, cudaStream_t stream) {
  if (params.n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(params.n_rows, kShrinkWarps)),
                  static_cast<unsigned>(cuda::ceil_div(params.rank, kShrinkRankTile)));
  PFP_CUDA_DISPATCH(params.dtype, multi_lora_shrink_kernel<scalar_t><<<grid, kShrinkWarps * 32, 0, stream>>>(params));
  cuda::check_launch("multi_lora_shrink_kernel");
}

void multi_lora_expand_cuda(const MultiLoraExpandParams& params, cudaStream_t stream) {
  const int64_t total = params.n_rows * params.out_cols;
  if (total == 0) return;
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(total, threads), 65535 * 16));
  PFP_CUDA_DISPATCH(params.dtype, multi_lora_expand_kernel<scalar_t><<<grid, threads, 0, stream>>>(params));
  cuda::check_launch("multi_lora_expand_kernel");
}

void multi_lora_group_cuda(const MultiLoraGroupParams& params, cudaStream_t stream) {
  if (params.indices.num_adapters > kMaxGroupAdapters) {
    throw std::runtime_error("multi_lora_group: too many adapters for the shared-memory histogram");
  }
  const size_t smem = static_cast<size_t>(params.indices.num_adapters + 1) * sizeof(unsigned long long);
  multi_lora_group_kernel<<<1, kGroupThreads, smem, stream>>>(params);
  cuda::check_launch("multi_lora_group_kernel");
}

void multi_lora_weight_grad_cuda(const MultiLoraWeightGradParams& params, cudaStream_t stream) {
  if (params.num_adapters == 0 || params.p_dim == 0 || params.q_dim == 0) return;
  PFP_CUDA_DISPATCH(params.dtype, launch_weight_grad<scalar_t>(params, stream));
  cuda::check_launch("multi_lora_weight_grad_kernel");
}

}  // namespace pyfastpeft
