// CUDA kernels of the quant family (formulas in quant.h). Torch-free: params structs and a stream.
//
// Contiguous groups with enough of them (pre == 1): one block per group reads it once for min/max and
// again, from L2, to quantize — one DRAM read and one write of x. Otherwise (per tensor, per channel on an
// inner axis) a stats kernel writes [splits, C] partial min/max, a one-thread-per-group kernel turns
// them into (scale, zero point), and an elementwise kernel quantizes. The LSQ backward writes dx and
// per-block [splits, C] partial scale / zero-point gradients that the glue sums (never full-size).
#include "pyfastpeft/cuda_utils.cuh"
#include "quant.h"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kThreads = 256;
constexpr int64_t kElementsPerSplit = 8192;

__host__ __device__ inline int64_t element_index(const QuantLayout& L, int64_t c, int64_t i) {
  const int64_t p = i / L.post, q = i - p * L.post;
  return (p * L.channels + c) * L.post + q;
}

struct MinOp {
  template <typename V>
  __device__ V operator()(V a, V b) const {
    return b < a ? b : a;
  }
};
struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const {
    return b > a ? b : a;
  }
};
struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const {
    return a + b;
  }
};

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename V, class Op>
__device__ V block_reduce(V v, Op op, V* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < warps; ++w) v = op(v, shared[w]);
  return v;
}

template <typename acc_t>
__device__ inline acc_t quantize_value(acc_t x, acc_t s, acc_t inv, acc_t z, acc_t qmin, acc_t qmax) {
  const acc_t q = round_half_even(x * inv) + z;
  return (clamp_code(q, qmin, qmax) - z) * s;
}

// One block per contiguous group c (grid-stride over groups).
template <typename T>
__global__ void __launch_bounds__(kThreads) group_fake_quantize_kernel(FakeQuantParams p) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t shared[kThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  acc_t* scale = static_cast<acc_t*>(p.scale);
  const int64_t n = p.layout.post;
  const acc_t qmin = static_cast<acc_t>(p.qmin), qmax = static_cast<acc_t>(p.qmax);
  for (int64_t c = blockIdx.x; c < p.layout.channels; c += gridDim.x) {
    const T* xc = x + c * n;
    acc_t lo = INFINITY, hi = -INFINITY, probe = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const acc_t v = load_acc(xc + i);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      probe += v * acc_t(0);
    }
    lo = block_reduce(lo, MinOp{}, shared);
    hi = block_reduce(hi, MaxOp{}, shared);
    probe = block_reduce(probe, SumOp{}, shared);
    acc_t s;
    int32_t zp;
    group_qparams(lo, hi, probe, p.symmetric, p.qmin, p.qmax, &s, &zp);
    if (threadIdx.x == 0) {
      scale[c] = s;
      p.zero_point[c] = zp;
    }
    const acc_t inv = inverse_scale(s), z = static_cast<acc_t>(zp);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      store_from_acc(out + c * n + i, quantize_value(load_acc(xc + i), s, inv, z, qmin, qmax));
    }
  }
}

// Partial min / max / probe of split blockIdx.y of every group: partial[k][split][c], k = lo, hi, probe.
template <typename T>
__global__ void __launch_bounds__(kThreads) channel_stats_kernel(FakeQuantParams p, int64_t splits,
                                                                 typename Acc<T>::type* partial) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t shared[kThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  const QuantLayout L = p.layout;
  const int64_t per_group = L.pre * L.post;
  const int64_t chunk = (per_group + splits - 1) / splits;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < per_group ? begin + chunk : per_group;
  for (int64_t c = blockIdx.x; c < L.channels; c += gridDim.x) {
    acc_t lo = INFINITY, hi = -INFINITY, probe = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const acc_t v = load_acc(x + element_index(L, c, i));
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      probe += v * acc_t(0);
    }
    lo = block_reduce(lo, MinOp{}, shared);
    hi = block_reduce(hi, MaxOp{}, shared);
    probe = block_reduce(probe, SumOp{}, shared);
    if (threadIdx.x == 0) {
      const int64_t slot = blockIdx.y * L.channels + c;
      partial[slot] = lo;
      partial[splits * L.channels + slot] = hi;
      partial[2 * splits * L.channels + slot] = probe;
    }
  }
}

template <typename acc_t>
__global__ void finalize_qparams_kernel(FakeQuantParams p, int64_t splits, const acc_t* partial) {
  const int64_t C = p.layout.channels;
  acc_t* scale = static_cast<acc_t*>(p.scale);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t lo = INFINITY, hi = -INFINITY, probe = 0;
    for (int64_t k = 0; k < splits; ++k) {
      const acc_t l = partial[k * C + c], h = partial[(splits + k) * C + c];
      lo = l < lo ? l : lo;
      hi = h > hi ? h : hi;
      probe += partial[(2 * splits + k) * C + c];
    }
    group_qparams(lo, hi, probe, p.symmetric, p.qmin, p.qmax, scale + c, p.zero_point + c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) apply_kernel(FakeQuantApplyParams p) {
  using acc_t = typename Acc<T>::type;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t qmin = static_cast<acc_t>(p.qmin), qmax = static_cast<acc_t>(p.qmax);
  const int64_t numel = p.layout.numel();
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (e / p.layout.post) % p.layout.channels;
    const acc_t s = scale[c];
    store_from_acc(out + e, quantize_value(load_acc(x + e), s, inverse_scale(s),
                                           static_cast<acc_t>(p.zero_point[c]), qmin, qmax));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ste_backward_kernel(FakeQuantBackwardParams p) {
  using acc_t = typename Acc<T>::type;
  const T* dy = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.grad_x);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t qmin = static_cast<acc_t>(p.qmin), qmax = static_cast<acc_t>(p.qmax);
  const int64_t numel = p.layout.numel();
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (e / p.layout.post) % p.layout.channels;
    const acc_t q = round_half_even(load_acc(x + e) * inverse_scale(scale[c])) + static_cast<acc_t>(p.zero_point[c]);
    dx[e] = (q >= qmin && q <= qmax) ? dy[e] : T(0);
  }
}

// dx, and split blockIdx.y's Σ ds and Σ dz of each group into partial_s / partial_z [splits, C].
template <typename T>
__global__ void __launch_bounds__(kThreads) lsq_backward_kernel(LsqBackwardParams p, int64_t splits) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t shared[kThreads / 32];
  const T* dy = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.grad_x);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  acc_t* partial_s = static_cast<acc_t*>(p.grad_scale);
  acc_t* partial_z = static_cast<acc_t*>(p.grad_zero_point);
  const QuantLayout L = p.layout;
  const acc_t qmin = static_cast<acc_t>(p.qmin), qmax = static_cast<acc_t>(p.qmax);
  const int64_t per_group = L.pre * L.post;
  const int64_t chunk = (per_group + splits - 1) / splits;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < per_group ? begin + chunk : per_group;
  for (int64_t c = blockIdx.x; c < L.channels; c += gridDim.x) {
    const acc_t s = scale[c], inv = inverse_scale(s), z = static_cast<acc_t>(p.zero_point[c]);
    acc_t sum_in = 0, sum_lo = 0, sum_hi = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const int64_t e = element_index(L, c, i);
      const acc_t g = load_acc(dy + e);
      const acc_t t = load_acc(x + e) * inv;
      const acc_t r = round_half_even(t);
      const bool below = r + z < qmin, above = r + z > qmax;
      if (dx != nullptr) dx[e] = (below || above) ? T(0) : dy[e];
      sum_in += (below || above) ? acc_t(0) : g * (r - t);
      sum_lo += below ? g : acc_t(0);
      sum_hi += above ? g : acc_t(0);
    }
    sum_in = block_reduce(sum_in, SumOp{}, shared);
    sum_lo = block_reduce(sum_lo, SumOp{}, shared);
    sum_hi = block_reduce(sum_hi, SumOp{}, shared);
    if (threadIdx.x == 0) {
      const int64_t slot = blockIdx.y * L.channels + c;
      const acc_t factor = static_cast<acc_t>(p.grad_factor);
      partial_s[slot] = (sum_in + sum_lo * (qmin - z) + sum_hi * (qmax - z)) * factor;
      if (partial_z != nullptr) partial_z[slot] = -(sum_lo + sum_hi) * s * factor;
    }
  }
}

int64_t splits_for(const QuantLayout& L) {
  const int64_t per_group = L.pre * L.post;
  int64_t splits = cuda::ceil_div(per_group, kElementsPerSplit);
  const int64_t fill = cuda::ceil_div(2048, L.channels);  // enough blocks when there are few groups
  splits = splits < fill ? splits : fill;
  return splits < 1 ? 1 : splits;
}

bool use_group_kernel(const QuantLayout& L) { return L.pre == 1 && L.channels >= 256; }

unsigned grid_for(int64_t items) {
  const int64_t g = items < (int64_t{1} << 20) ? items : (int64_t{1} << 20);
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

unsigned elementwise_grid(int64_t numel) { return grid_for(cuda::ceil_div(numel, kThreads)); }

// Group kernels: a warp for short groups, up to kThreads threads for long ones.
unsigned group_threads(int64_t group_elements) {
  int64_t t = 32;
  while (t < kThreads && t * 8 < group_elements) t *= 2;
  return static_cast<unsigned>(t);
}

}  // namespace

int64_t fake_quantize_cuda_workspace_elements(const QuantLayout& layout) {
  return use_group_kernel(layout) ? 0 : 3 * splits_for(layout) * layout.channels;
}

void fake_quantize_cuda(const FakeQuantParams& p, void* workspace, cudaStream_t stream) {
  const QuantLayout& L = p.layout;
  if (use_group_kernel(L)) {
    PFP_CUDA_DISPATCH(p.dtype, {
      group_fake_quantize_kernel<scalar_t><<<grid_for(L.channels), group_threads(L.post), 0, stream>>>(p);
      cuda::check_launch("group_fake_quantize_kernel");
    });
    return;
  }
  const int64_t splits = splits_for(L);
  const dim3 grid(grid_for(L.channels), static_cast<unsigned>(splits));
  PFP_CUDA_DISPATCH(p.dtype, {
    using acc_t = typename Acc<scalar_t>::type;
    acc_t* partial = static_cast<acc_t*>(workspace);
    channel_stats_kernel<scalar_t><<<grid, group_threads(L.pre * L.post / splits), 0, stream>>>(p, splits, partial);
    cuda::check_launch("channel_stats_kernel");
    finalize_qparams_kernel<acc_t><<<grid_for(cuda::ceil_div(L.channels, kThreads)), kThreads, 0, stream>>>(
        p, splits, partial);
    cuda::check_launch("finalize_qparams_kernel");
  });
  fake_quantize_apply_cuda({p.x, p.out, p.scale, p.zero_point, L, p.qmin, p.qmax, p.dtype}, stream);
}

void fake_quantize_apply_cuda(const FakeQuantApplyParams& p, cudaStream_t stream) {
  PFP_CUDA_DISPATCH(p.dtype, {
    apply_kernel<scalar_t><<<elementwise_grid(p.layout.numel()), kThreads, 0, stream>>>(p);
    cuda::check_launch("apply_kernel");
  });
}

void fake_quantize_backward_cuda(const FakeQuantBackwardParams& p, cudaStream_t stream) {
  PFP_CUDA_DISPATCH(p.dtype, {
    ste_backward_kernel<scalar_t><<<elementwise_grid(p.layout.numel()), kThreads, 0, stream>>>(p);
    cuda::check_launch("ste_backward_kernel");
  });
}

int64_t lsq_backward_cuda_splits(const QuantLayout& layout) { return splits_for(layout); }

void lsq_backward_cuda(const LsqBackwardParams& p, int64_t splits, cudaStream_t stream) {
  const QuantLayout& L = p.layout;
  const dim3 grid(grid_for(L.channels), static_cast<unsigned>(splits));
  PFP_CUDA_DISPATCH(p.dtype, {
    lsq_backward_kernel<scalar_t><<<grid, group_threads(L.pre * L.post / splits), 0, stream>>>(p, splits);
    cuda::check_launch("lsq_backward_kernel");
  });
}

}  // namespace pyfastpeft
