// CUDA kernels of the gguf family (formats in gguf.h). Torch-free: params structs and a stream.
//
// Simple and correct by construction rather than tuned: each weight is decoded where it is used, from
// its block's fp16 header and its code, in registers; the whole float weight never exists.
//  - forward: one warp per output y[n, o]; lane l takes blocks l, l + 32, ... of row o, dots them with x
//    and the warp sums its lanes with shuffles;
//  - backward: one warp per (token n, column block); lane j is column 32·block + j and sums dy[n, o]·W[o, j]
//    over the rows o in order;
//  - dequantize / embedding: one thread per output element; quantize: one thread per block.
#include "gguf.h"
#include "pyfastpeft/cuda_utils.cuh"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 65535;

__device__ __forceinline__ float half_at(const uint8_t* p) {
  const uint16_t bits = static_cast<uint16_t>(p[0] | (p[1] << 8));
  return __half2float(__ushort_as_half(bits));
}

// Weight j (0..31) of the block at b, in the accumulation type.
template <typename A>
__device__ __forceinline__ A weight_at(int qtype, const uint8_t* b, int j) {
  const A d = static_cast<A>(half_at(b));
  if (qtype == kGGUFQ4_1) return d * static_cast<A>(gguf_code(qtype, b + 4, j)) + static_cast<A>(half_at(b + 2));
  return d * static_cast<A>(gguf_code(qtype, b + 2, j));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

int64_t grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = cuda::ceil_div(work, per_block);
  return blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) linear_kernel(GGUFLinearParams p) {
  using A = typename Acc<T>::type;
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t bb = gguf_block_bytes(p.qtype), nb = p.cols / kGGUFBlock, rb = nb * bb;
  const int lane = threadIdx.x % 32;
  const int64_t total = p.tokens * p.rows;
  for (int64_t out = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; out < total;
       out += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t n = out / p.rows, o = out - n * p.rows;
    const uint8_t* row = p.blocks + o * rb;
    const T* xn = x + n * p.cols;
    A acc = 0;
    for (int64_t k = lane; k < nb; k += 32) {
      const uint8_t* b = row + k * bb;
      for (int j = 0; j < kGGUFBlock; ++j) acc += weight_at<A>(p.qtype, b, j) * load_acc(xn + k * kGGUFBlock + j);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (bias != nullptr) acc += load_acc(bias + o);
      store_from_acc(y + out, acc);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) linear_backward_kernel(GGUFLinearBackwardParams p) {
  using A = typename Acc<T>::type;
  const T* dy = static_cast<const T*>(p.grad_y);
  T* dx = static_cast<T*>(p.grad_x);
  const int64_t bb = gguf_block_bytes(p.qtype), nb = p.cols / kGGUFBlock, rb = nb * bb;
  const int lane = threadIdx.x % 32;
  const int64_t total = p.tokens * nb;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; w < total;
       w += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t n = w / nb, k = w - n * nb;
    const T* dyn = dy + n * p.rows;
    A acc = 0;
    for (int64_t o = 0; o < p.rows; ++o) acc += load_acc(dyn + o) * weight_at<A>(p.qtype, p.blocks + o * rb + k * bb, lane);
    store_from_acc(dx + n * p.cols + k * kGGUFBlock + lane, acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_kernel(GGUFRowsParams p) {
  using A = typename Acc<T>::type;
  T* out = static_cast<T*>(p.out);
  const int64_t bb = gguf_block_bytes(p.qtype), rb = p.cols / kGGUFBlock * bb;
  const int64_t total = p.n_ids * p.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / p.cols, c = e - i * p.cols;
    const int64_t row = p.ids != nullptr ? p.ids[i] : i;
    const uint8_t* b = p.blocks + row * rb + (c / kGGUFBlock) * bb;
    store_from_acc(out + e, weight_at<A>(p.qtype, b, static_cast<int>(c % kGGUFBlock)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(GGUFQuantizeParams p) {
  const T* w = static_cast<const T*>(p.weight);
  const int64_t bb = gguf_block_bytes(p.qtype), total = p.rows * (p.cols / kGGUFBlock);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[kGGUFBlock];
    for (int j = 0; j < kGGUFBlock; ++j) v[j] = static_cast<float>(load_acc(w + i * kGGUFBlock + j));
    uint8_t* dst = p.blocks + i * bb;
    float m = 0.0f;
    const float d = gguf_quantize_block(p.qtype, v, dst + (p.qtype == kGGUFQ4_1 ? 4 : 2), &m);
    const uint16_t db = __half_as_ushort(__float2half_rn(d));
    dst[0] = static_cast<uint8_t>(db & 0xFF), dst[1] = static_cast<uint8_t>(db >> 8);
    if (p.qtype == kGGUFQ4_1) {
      const uint16_t mb = __half_as_ushort(__float2half_rn(m));
      dst[2] = static_cast<uint8_t>(mb & 0xFF), dst[3] = static_cast<uint8_t>(mb >> 8);
    }
  }
}

}  // namespace

void gguf_linear_cuda(const GGUFLinearParams& params, cudaStream_t stream) {
  const int64_t grid = grid_for(params.tokens * params.rows, kWarps);
  PFP_CUDA_DISPATCH(params.dtype, linear_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params));
  cuda::check_launch("gguf linear_kernel");
}

void gguf_linear_backward_cuda(const GGUFLinearBackwardParams& params, cudaStream_t stream) {
  const int64_t grid = grid_for(params.tokens * (params.cols / kGGUFBlock), kWarps);
  PFP_CUDA_DISPATCH(params.dtype, linear_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params));
  cuda::check_launch("gguf linear_backward_kernel");
}

void gguf_rows_cuda(const GGUFRowsParams& params, cudaStream_t stream) {
  const int64_t grid = grid_for(params.n_ids * params.cols, kThreads);
  PFP_CUDA_DISPATCH(params.dtype, rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params));
  cuda::check_launch("gguf rows_kernel");
}

void gguf_quantize_cuda(const GGUFQuantizeParams& params, cudaStream_t stream) {
  const int64_t grid = grid_for(params.rows * (params.cols / kGGUFBlock), kThreads);
  PFP_CUDA_DISPATCH(params.dtype, quantize_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params));
  cuda::check_launch("gguf quantize_kernel");
}

}  // namespace pyfastpeft
