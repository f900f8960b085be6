// Multi-adapter LoRA linear over a mixed batch: torch-free parameter structs and CUDA launchers.
//
// Token n (x [N, in] flattened) uses adapter a(n) ∈ {-1, 0..K-1}; -1 means "base layer only".
//   y[n]  = x[n]·Wᵀ + b + s[a(n)]·(drop(x)[n]·A[a(n)]ᵀ)·B[a(n)]ᵀ     A [K, r, in], B [K, out, r], s [K]
//   xa[n] = drop(x)[n]·A[a(n)]ᵀ  (0 when a(n) = -1)                   saved for backward, float32/float64
// Backward, with u[n] = s[a(n)]·dy[n]·B[a(n)]:
//   dx[n] = dy[n]·W + drop'(u[n]·A[a(n)])
//   dA[k] = Σ_{n: a(n)=k} u[n]ᵀ·drop(x)[n]        dB[k] = s[k]·Σ_{n: a(n)=k} dy[n]ᵀ·xa[n]
// Smaller ranks are zero-padded to r: zero rows of A / columns of B stay zero and get zero gradients.
// An index outside [-1, K) is rejected on the CPU; the CUDA kernels treat it as -1 (no adapter) and
// never read out of bounds, since checking it would need a host synchronisation.
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

// Per-token adapter indices, int32 or int64, [n_rows] contiguous.
struct AdapterIndices {
  const void* data;
  bool is_int32;
  int64_t num_adapters;
};

// Shrink with a per-token gather of the adapter's matrix:
//   out[n, j] = scale[a(n)] · Σ_c drop(in)[n, c] · M[a(n)][j, c]      (out = 0 when a(n) = -1)
// `in` [n_rows, cols] has the kernel dtype; `out` [n_rows, rank] is float32 (float64 for float64).
// M's element (k, j, c) sits at M + k·stride_adapter + j·stride_j + c·stride_c, so the same kernel
// computes xa = x·Aᵀ (stride_j = in, stride_c = 1) and u = s·dy·B (stride_j = 1, stride_c = r).
struct MultiLoraShrinkParams {
  const void* in;
  const void* M;
  const double* scalings;  // [K] on the device, or nullptr for 1
  AdapterIndices indices;
  void* out;
  int64_t n_rows, cols, rank;
  int64_t stride_adapter, stride_j, stride_c;
  float p;                   // dropout on `in`, applied on load; the mask is indexed by n·cols + c
  double dropout_scale;      // 1 / (1 - p)
  const int64_t* rng_state;  // nullptr: no dropout
  DType dtype;
};

// Expand with a per-token gather, added into the output in place:
//   out[n, o] = (accumulate ? out[n, o] : 0) + scale[a(n)] · Σ_j in[n, j] · M[a(n)][o, j]
// `in` [n_rows, rank] is float32 (float64 for float64); `out` [n_rows, out_cols] has the kernel dtype.
// M's element (k, o, j) sits at M + k·stride_adapter + o·stride_o + j·stride_j.
struct MultiLoraExpandParams {
  const void* in;
  const void* M;
  const double* scalings;  // nullptr for 1
  AdapterIndices indices;
  void* out;
  int64_t n_rows, out_cols, rank;
  int64_t stride_adapter, stride_o, stride_j;
  bool accumulate;
  DType dtype;
};

// Stable counting sort of tokens by adapter, computed on the device:
//   offsets[k] .. offsets[k+1] delimit the tokens of adapter k in sorted_tokens, in token order.
// Tokens with no adapter (or an out-of-range index) are left out. Needs num_adapters ≤ kMaxGroupAdapters.
struct MultiLoraGroupParams {
  AdapterIndices indices;
  int64_t n_rows;
  int64_t* sorted_tokens;  // [n_rows]
  int64_t* offsets;        // [K + 1]
};
constexpr int64_t kMaxGroupAdapters = 4096;  // the histogram lives in 32 KiB of shared memory

// Per-adapter sum of outer products over the adapter's tokens (the weight gradients):
//   G[k][p, q] = scale[k] · Σ_{n: a(n)=k} P[n, p] · drop(Q)[n, q]        G [K, p_dim, q_dim]
// P [n_rows, p_dim] and Q [n_rows, q_dim] are row-major; each is in the kernel dtype or, where
// p_is_acc / q_is_acc, in its accumulation type. G has the kernel dtype and is written in full
// (zero for adapters with no tokens). Summation follows token order: the result is deterministic.
struct MultiLoraWeightGradParams {
  const void* P;
  const void* Q;
  bool p_is_acc, q_is_acc;
  const double* scalings;  // nullptr for 1
  const int64_t* sorted_tokens;
  const int64_t* offsets;
  void* G;
  int64_t num_adapters, p_dim, q_dim;
  float p;  // dropout on Q, indexed by n·q_dim + q
  double dropout_scale;
  const int64_t* rng_state;  // nullptr: no dropout
  DType dtype;
};

void multi_lora_shrink_cuda(const MultiLoraShrinkParams& params, cudaStream_t stream);
void multi_lora_expand_cuda(const MultiLoraExpandParams& params, cudaStream_t stream);
void multi_lora_group_cuda(const MultiLoraGroupParams& params, cudaStream_t stream);
void multi_lora_weight_grad_cuda(const MultiLoraWeightGradParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
