// Fused LoRA linear: torch-free parameter structs and launchers.
//
//   y  = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        x [N, in], W [out, in], A [r, in], B [out, r]
//   xa = drop(x)·Aᵀ                            saved for backward (N·r elements)
// Backward, with u = s·dy·B:
//   dx = dy·W + drop'(u·A)     dA = uᵀ·drop(x)     dB = s·dyᵀ·xa     db = Σ_n dy     dW = dyᵀ·x
// drop(·) multiplies by the Philox mask (see pyfastpeft/dropout.h) and 1/(1-p); the backward regenerates
// the mask from rng_state = [seed, offset], so neither the mask nor drop(x) is ever saved.
#pragma once
#include <cstdint>

#include "pyfastpeft/dropout.h"
#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

// xa[n, j] = Σ_k drop(x)[n, k] · A[j, k], accumulated in float32 (float64 for float64 inputs).
struct LoraShrinkParams {
  const void* x;  // [n_rows, in], contiguous
  const void* A;  // [r, in], contiguous
  void* xa;       // [n_rows, r]
  int64_t n_rows, in_features, rank;
  float p;
  double scale;
  const int64_t* rng_state;  // nullptr when p == 0
  DType dtype;
};

// With u = s·dy·B: dx = drop'(u·A) and dA = uᵀ·drop(x), sharing one draw of the mask.
// dx or dA may be nullptr when that gradient is not needed.
struct LoraDropoutBackwardParams {
  const void* x;  // [n_rows, in], contiguous
  const void* u;  // [n_rows, r]
  const void* A;  // [r, in]
  void* dx;       // [n_rows, in] or nullptr
  void* dA;       // [r, in] or nullptr
  int64_t n_rows, in_features, rank;
  float p;
  double scale;
  const int64_t* rng_state;
  DType dtype;
};

void lora_shrink_cuda(const LoraShrinkParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
