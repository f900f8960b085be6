// Sparse fine-tuning: W = W₀ + Δ, where Δ has k non-zero entries at sorted flat indices idx_j.
//
// sampled_weight_grad (the backward of Δ, never a dense dW):
//   r_j = idx_j / in,  c_j = idx_j mod in
//   dΔ_j = Σ_n dy[n, r_j] · x[n, c_j]        dy [N, out], x [N, in], dΔ [k]
// Both kernels turn this into contiguous dot products over N in feature-major data (dyᵀ [out, N],
// xᵀ [in, N]); sorted indices make consecutive j share the row dyᵀ[r_j]. The CPU kernel reads row-major
// inputs and transposes one slab of N at a time into a float buffer (cache-sized, never a full copy);
// the CUDA kernel reads feature-major copies made by its glue, so every warp load is coalesced.
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

struct SampledGradParams {
  const void* grad_y;    // CPU: [n_rows, out_features] row-major; CUDA: [out_features, n_rows]; contiguous
  const void* x;         // CPU: [n_rows, in_features] row-major;  CUDA: [in_features, n_rows]; contiguous
  const void* indices;   // [k], sorted flat indices into [out_features, in_features]
  bool indices_int32;    // int32 indices, else int64
  void* out;             // [k]
  int64_t n_rows, in_features, out_features, k;
  DType dtype;  // of grad_y, x and out
};

void sampled_weight_grad_cpu(const SampledGradParams& params);
void sampled_weight_grad_cuda(const SampledGradParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
