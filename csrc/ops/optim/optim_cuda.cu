// CUDA kernels of the optim family. Torch-free: they see params structs and a stream.
//
// Multi-tensor apply: the tensors' pointers travel in the kernel arguments (up to kMaxTensors per launch,
// which needs the 32 KB kernel-parameter limit of CUDA 12.1+ on sm_70+), every tensor is cut into
// kChunk-element chunks, and block b finds its tensor by binary search over the chunk prefix sums.
// Nothing is copied host→device, so a step can be captured in a CUDA graph.
#include <algorithm>
#include <unordered_map>

#include "optim.h"
#include "pyfastpeft/cuda_utils.cuh"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kMaxTensors = 256;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per block: 16 per thread

struct AdamWMeta {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  void* max_exp_avg_sq[kMaxTensors];
  void* master[kMaxTensors];
  const void* anchor[kMaxTensors];
  float* step[kMaxTensors];
  // Later entries of this launch that share tensor i's step: tensor i uses *step[i] − step_lag[i], the
  // count its step reached at its own turn, as on the CPU (which increments the entries in order).
  int step_lag[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxTensors + 1];  // prefix sums of chunks per tensor
  int n_tensors;
  const double* lr;
  const float* grad_scale;
  double beta1, beta2, eps, weight_decay, l2sp;
  bool maximize, amsgrad, use_master, use_anchor;
};

struct NormMeta {
  const void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxTensors + 1];
  int n_tensors;
};

// Largest i with chunk_start[i] <= chunk.
__device__ __forceinline__ int find_tensor(const int64_t* chunk_start, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Atomic: one step tensor may be shared by several entries (exact in float up to 2^24 steps).
__global__ void increment_steps_kernel(AdamWMeta meta) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < meta.n_tensors) atomicAdd(meta.step[i], 1.0f);
}

// The update of optim.h on one chunk. P: parameter/gradient type; S: state type (P, or float with
// master weights). Per-tensor scalars come from the device-side step and lr, in float64 like torch.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamWMeta meta) {
  using acc_t = typename Acc<S>::type;
  const int64_t chunk = blockIdx.x;
  const int t = find_tensor(meta.chunk_start, meta.n_tensors, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunk;
  const int64_t end = min(begin + kChunk, meta.numel[t]);

  const double lr = *meta.lr;
  const double step = static_cast<double>(*meta.step[t] - static_cast<float>(meta.step_lag[t]));
  const acc_t neg_step = static_cast<acc_t>(-lr / (1.0 - pow(meta.beta1, step)));
  const acc_t bc2_sqrt = static_cast<acc_t>(sqrt(1.0 - pow(meta.beta2, step)));
  const acc_t decay = static_cast<acc_t>(1.0 - lr * meta.weight_decay);
  const acc_t w1 = static_cast<acc_t>(1.0 - meta.beta1), b2 = static_cast<acc_t>(meta.beta2);
  const acc_t w2 = static_cast<acc_t>(1.0 - meta.beta2), eps = static_cast<acc_t>(meta.eps);
  const acc_t l2sp = static_cast<acc_t>(meta.l2sp);
  const acc_t gs = meta.grad_scale ? static_cast<acc_t>(*meta.grad_scale) : acc_t(1);

  P* param = static_cast<P*>(meta.param[t]);
  const P* grad = static_cast<const P*>(meta.grad[t]);
  S* m = static_cast<S*>(meta.exp_avg[t]);
  S* v = static_cast<S*>(meta.exp_avg_sq[t]);
  S* vmax = meta.amsgrad ? static_cast<S*>(meta.max_exp_avg_sq[t]) : nullptr;
  S* theta_master = meta.use_master ? static_cast<S*>(meta.master[t]) : nullptr;
  const S* anchor = meta.use_anchor ? static_cast<const S*>(meta.anchor[t]) : nullptr;

  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    acc_t theta = theta_master ? load_acc(theta_master + e) : static_cast<acc_t>(load_acc(param + e));
    acc_t g = static_cast<acc_t>(load_acc(grad + e)) * gs;
    if (anchor) g += l2sp * (theta - load_acc(anchor + e));
    if (meta.maximize) g = -g;
    theta *= decay;
    const acc_t m_old = load_acc(m + e);
    store_from_acc(m + e, m_old + w1 * (g - m_old));
    const acc_t m_new = load_acc(m + e);  // rounded to S, as the stored moment
    store_from_acc(v + e, load_acc(v + e) * b2);
    store_from_acc(v + e, load_acc(v + e) + w2 * g * g);
    acc_t v_new = load_acc(v + e);
    if (vmax) {
      v_new = max(load_acc(vmax + e), v_new);
      store_from_acc(vmax + e, v_new);
    }
    theta += neg_step * (m_new / (sqrt(v_new) / bc2_sqrt + eps));
    if (theta_master) store_from_acc(theta_master + e, theta);
    store_from_acc(param + e, static_cast<typename Acc<P>::type>(theta));
  }
}

// Block-wide sum of one value per thread, returned to thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// partial[chunk] = Σ x² over one chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(NormMeta meta, float* partial) {
  const int64_t chunk = blockIdx.x;
  const int t = find_tensor(meta.chunk_start, meta.n_tensors, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunk;
  const int64_t end = min(begin + kChunk, meta.numel[t]);
  const T* x = static_cast<const T*>(meta.data[t]);
  float acc = 0;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const float v = static_cast<float>(load_acc(x + e));
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[chunk] = acc;
}

// out = sqrt(Σ partial), one block.
__global__ void __launch_bounds__(kThreads) finish_norm_kernel(const float* partial, int64_t n, float* out) {
  float acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = sqrtf(acc);
}

int64_t chunks_of(int64_t numel) { return cuda::ceil_div(numel, kChunk); }

}  // namespace

void fused_adamw_cuda(const AdamWParams& p, cudaStream_t stream) {
  for (int64_t first = 0; first < p.n_tensors; first += kMaxTensors) {
    const int n = static_cast<int>(std::min<int64_t>(kMaxTensors, p.n_tensors - first));
    AdamWMeta meta{};
    meta.chunk_start[0] = 0;
    for (int i = 0; i < n; ++i) {
      const int64_t s = first + i;
      meta.param[i] = p.param[s];
      meta.grad[i] = p.grad[s];
      meta.exp_avg[i] = p.exp_avg[s];
      meta.exp_avg_sq[i] = p.exp_avg_sq[s];
      meta.max_exp_avg_sq[i] = p.max_exp_avg_sq ? p.max_exp_avg_sq[s] : nullptr;
      meta.master[i] = p.master ? p.master[s] : nullptr;
      meta.anchor[i] = p.anchor ? p.anchor[s] : nullptr;
      meta.step[i] = p.step[s];
      meta.numel[i] = p.numel[s];
      meta.chunk_start[i + 1] = meta.chunk_start[i] + chunks_of(p.numel[s]);
    }
    std::unordered_map<const float*, int> later;  // entries after the current one, per step tensor
    for (int i = n - 1; i >= 0; --i) meta.step_lag[i] = later[meta.step[i]]++;
    meta.n_tensors = n;
    meta.lr = p.lr;
    meta.grad_scale = p.grad_scale;
    meta.beta1 = p.beta1;
    meta.beta2 = p.beta2;
    meta.eps = p.eps;
    meta.weight_decay = p.weight_decay;
    meta.l2sp = p.l2sp;
    meta.maximize = p.maximize;
    meta.amsgrad = p.max_exp_avg_sq != nullptr;
    meta.use_master = p.master != nullptr;
    meta.use_anchor = p.anchor != nullptr;
    increment_steps_kernel<<<static_cast<unsigned>(cuda::ceil_div(n, kThreads)), kThreads, 0, stream>>>(meta);
    cuda::check_launch("increment_steps_kernel");
    const int64_t n_chunks = meta.chunk_start[n];
    if (n_chunks == 0) continue;
    const unsigned grid = static_cast<unsigned>(n_chunks);
    switch (p.param_dtype) {
      case DType::Float64: adamw_kernel<double, double><<<grid, kThreads, 0, stream>>>(meta); break;
      case DType::Float32: adamw_kernel<float, float><<<grid, kThreads, 0, stream>>>(meta); break;
      case DType::BFloat16:
        if (meta.use_master) adamw_kernel<__nv_bfloat16, float><<<grid, kThreads, 0, stream>>>(meta);
        else adamw_kernel<__nv_bfloat16, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(meta);
        break;
      case DType::Float16:
        if (meta.use_master) adamw_kernel<__half, float><<<grid, kThreads, 0, stream>>>(meta);
        else adamw_kernel<__half, __half><<<grid, kThreads, 0, stream>>>(meta);
        break;
    }
    cuda::check_launch("adamw_kernel");
  }
}

int64_t multi_tensor_l2_norm_workspace(const L2NormParams& p) {
  int64_t total = 0;
  for (int64_t i = 0; i < p.n_tensors; ++i) total += chunks_of(p.numel[i]);
  return std::max<int64_t>(total, 1);
}

void multi_tensor_l2_norm_cuda(const L2NormParams& p, float* workspace, cudaStream_t stream) {
  int64_t offset = 0;
  for (int64_t first = 0; first < p.n_tensors; first += kMaxTensors) {
    const int n = static_cast<int>(std::min<int64_t>(kMaxTensors, p.n_tensors - first));
    NormMeta meta{};
    for (int i = 0; i < n; ++i) {
      meta.data[i] = p.data[first + i];
      meta.numel[i] = p.numel[first + i];
      meta.chunk_start[i + 1] = meta.chunk_start[i] + chunks_of(p.numel[first + i]);
    }
    meta.n_tensors = n;
    const int64_t n_chunks = meta.chunk_start[n];
    if (n_chunks == 0) continue;
    PFP_CUDA_DISPATCH(p.dtype, sum_squares_kernel<scalar_t>
                      <<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(meta, workspace + offset));
    cuda::check_launch("sum_squares_kernel");
    offset += n_chunks;
  }
  finish_norm_kernel<<<1, kThreads, 0, stream>>>(workspace, offset, p.out);
  cuda::check_launch("finish_norm_kernel");
}

}  // namespace pyfastpeft
