// CUDA kernels of the distillation family. Torch-free: they see a params struct and a stream.
#include "distill.h"
#include "pyfastpeft/cuda_utils.cuh"

namespace pyfastpeft {
namespace {

using cuda::Acc;
using cuda::load_acc;
using cuda::store_from_acc;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float exp_a(float x) { return expf(x); }
__device__ __forceinline__ double exp_a(double x) { return exp(x); }
__device__ __forceinline__ float log_a(float x) { return logf(x); }
__device__ __forceinline__ double log_a(double x) { return log(x); }
// v where p > 0, else 0: 0·log 0 = 0, so a masked (-inf) logit contributes 0 instead of NaN.
template <typename A>
__device__ __forceinline__ A where_positive(A p, A v) {
  return p > A(0) ? v : A(0);
}

// Sum (or max) over the block; every thread gets the result. `shared` holds one value per warp.
template <typename A, bool kMax>
__device__ A block_reduce(A v, A* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  __syncthreads();  // the previous reduction's readers are done with `shared`
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  const A neutral = kMax ? -INFINITY : A(0);
  v = (threadIdx.x % 32) < kWarps ? shared[threadIdx.x % 32] : neutral;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  return v;
}

// A row whose label is ignore_index (it counts for nothing) or out of range (flagged, reported as a
// ValueError by the caller; never used as an index): its gradient zeroed, its loss 0 or NaN. Returns
// whether the row was such a row; the whole block takes the same branch.
template <typename T, typename A>
__device__ bool skip_row(const KdLossParams& p, int64_t label, T* grad, A* row_loss) {
  const bool ignored = label == p.ignore_index;
  if (!ignored && label >= 0 && label < p.vocab) return false;
  if (grad != nullptr) {
    for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) store_from_acc(grad + j, A(0));
  }
  if (threadIdx.x == 0) {
    *row_loss = ignored ? A(0) : A(NAN);
    if (!ignored) *p.bad_label = 1;
  }
  return true;
}

// Per-thread online softmax over a strided slice, then merged over the block: returns logsumexp.
template <typename A>
struct Online {
  A max = -INFINITY, sum = 0;
  __device__ void add(A x) {
    if (x > max) {
      sum = (max == -INFINITY ? A(0) : sum * exp_a(max - x)) + A(1);
      max = x;
    } else if (x != -INFINITY) {  // a -inf (masked) logit adds 0; with max = -inf too, exp would give NaN
      sum += exp_a(x - max);
    }
  }
  __device__ A logsumexp(A* shared) const {
    const A m = block_reduce<A, true>(max, shared);
    const A s = block_reduce<A, false>(max == -INFINITY ? A(0) : sum * exp_a(max - m), shared);
    return m + log_a(s);
  }
};

// One block per row (see distill.h for the math). Sweep 1 folds z = s/T, u = t/T (and s when the
// cross-entropy needs softmax(s) at T != 1) into online-softmax statistics; sweep 2 sums the divergence
// (the forward KL writes its gradient there too); sweep 3 writes the reverse-KL / JS gradient. The
// later sweeps re-read the row, which the first left in L2. Every element of the gradient is written by
// the thread that last reads it from `student`, so the gradient may overwrite the student logits; the
// one element read by another thread, s[label], is read before any barrier that precedes a store.
template <typename T>
__global__ void __launch_bounds__(kThreads) kd_loss_rows_kernel(KdLossParams p) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kWarps];
  const int64_t V = p.vocab;
  const int64_t n_valid = *p.n_valid;
  const A temperature = static_cast<A>(p.temperature), inv_T = A(1) / temperature;
  const A alpha = static_cast<A>(p.alpha);
  const bool with_ce = alpha != A(0);
  const bool ce_on_z = p.temperature == 1.0;
  const A scale = A(1) / static_cast<A>(n_valid > 1 ? n_valid : 1);
  const A c_ce = alpha * scale, c_kd = (A(1) - alpha) * temperature * scale;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* s = static_cast<const T*>(p.student) + row * p.student_stride;
    const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_stride;
    T* grad = p.grad == nullptr ? nullptr : static_cast<T*>(p.grad) + row * V;
    A* row_loss = static_cast<A*>(p.row_loss) + row;
    int64_t label = -1;
    if (p.labels != nullptr) {
      label = p.labels[row];
      if (skip_row(p, label, grad, row_loss)) continue;
    }
    // s[label] is read before the first block reduction: its barriers order this read before any
    // thread's gradient store, which may overwrite s[label] when the gradient aliases the student.
    const A s_label = with_ce && label >= 0 ? load_acc(s + label) : A(0);
    Online<A> oz, ou, os;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const A sj = load_acc(s + j);
      oz.add(sj * inv_T);
      ou.add(load_acc(t + j) * inv_T);
      if (with_ce && !ce_on_z) os.add(sj);
    }
    const A lse_z = oz.logsumexp(shared), lse_u = ou.logsumexp(shared);
    const A lse_s = (with_ce && !ce_on_z) ? os.logsumexp(shared) : lse_z * temperature;
    const A ce = with_ce ? lse_s - s_label : A(0);

    // Gradient of element j given ps_j and ∂D/∂z_j.
    auto write_grad = [&](int64_t j, A sj, A ps, A d_dz) {
      A g = c_kd * d_dz;
      if (with_ce) g += c_ce * ((ce_on_z ? ps : exp_a(sj - lse_s)) - (j == label ? A(1) : A(0)));
      store_from_acc(grad + j, g);
    };
    A d_part = 0, g_part = 0;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const A sj = load_acc(s + j);
      const A lz = sj * inv_T - lse_z, lu = load_acc(t + j) * inv_T - lse_u;
      const A ps = exp_a(lz), pt = exp_a(lu);
      if (p.divergence == Divergence::ForwardKL) {
        d_part += pt * where_positive(pt, lu - lz);
        if (grad != nullptr) write_grad(j, sj, ps, ps - pt);
      } else if (p.divergence == Divergence::ReverseKL) {
        d_part += ps * where_positive(ps, lz - lu);
      } else {
        const A lm = log_a(A(0.5) * (ps + pt));
        const A g = where_positive(ps, A(0.5) * (lz - lm));
        d_part += ps * g + A(0.5) * pt * where_positive(pt, lu - lm);
        g_part += ps * g;
      }
    }
    const A D = block_reduce<A, false>(d_part, shared);
    if (grad != nullptr && p.divergence != Divergence::ForwardKL) {
      const A centre = p.divergence == Divergence::ReverseKL ? D : block_reduce<A, false>(g_part, shared);
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        const A sj = load_acc(s + j);
        const A lz = sj * inv_T - lse_z, lu = load_acc(t + j) * inv_T - lse_u;
        const A ps = exp_a(lz);
        A factor;
        if (p.divergence == Divergence::ReverseKL) {
          factor = where_positive(ps, lz - lu);
        } else {
          factor = where_positive(ps, A(0.5) * (lz - log_a(A(0.5) * (ps + exp_a(lu)))));
        }
        write_grad(j, sj, ps, ps * (factor - centre));
      }
    }
    if (threadIdx.x == 0) *row_loss = (alpha * ce + (A(1) - alpha) * temperature * temperature * D) * scale;
    __syncthreads();  // `shared` is reused by the next row
  }
}

// The plain cross-entropy (no teacher, see distill.h): one block per row, the online softmax of s, then
// grad = (softmax(s) − onehot(label)) / n_valid. As above, each gradient element is written by the thread
// that reads it, and s[label] is read before the first barrier.
template <typename T>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(KdLossParams p) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kWarps];
  const int64_t V = p.vocab;
  const int64_t n_valid = *p.n_valid;
  const A scale = A(1) / static_cast<A>(n_valid > 1 ? n_valid : 1);
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* s = static_cast<const T*>(p.student) + row * p.student_stride;
    T* grad = p.grad == nullptr ? nullptr : static_cast<T*>(p.grad) + row * V;
    A* row_loss = static_cast<A*>(p.row_loss) + row;
    const int64_t label = p.labels[row];
    if (skip_row(p, label, grad, row_loss)) continue;
    const A s_label = load_acc(s + label);
    Online<A> o;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) o.add(load_acc(s + j));
    const A lse = o.logsumexp(shared);
    if (grad != nullptr) {
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        store_from_acc(grad + j, scale * (exp_a(load_acc(s + j) - lse) - (j == label ? A(1) : A(0))));
      }
    }
    if (threadIdx.x == 0) *row_loss = (lse - s_label) * scale;
    __syncthreads();  // `shared` is reused by the next row
  }
}

}  // namespace

void kd_loss_rows_cuda(const KdLossParams& params, cudaStream_t stream) {
  if (params.n_rows == 0) return;
  const unsigned grid = static_cast<unsigned>(params.n_rows < 1048576 ? params.n_rows : 1048576);
  if (params.teacher == nullptr) {
    PFP_CUDA_DISPATCH(params.dtype, ce_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params));
    cuda::check_launch("ce_rows_kernel");
    return;
  }
  PFP_CUDA_DISPATCH(params.dtype, kd_loss_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params));
  cuda::check_launch("kd_loss_rows_kernel");
}

}  // namespace pyfastpeft
