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

// xa[n, j] = Σ_k drop(x)[n, k] · A[j, k], accumulated in float32 (float64 for float64 inputs); p = 0
// is no dropout (float32 and float64 only: the 16-bit types without dropout go to the BLAS).
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

// y[n, :] = (accumulate ? y[n, :] : bias) + s·u[n, :]·V with V [r, cols] row-major (Bᵀ for the forward's
// expand, A as it is for the backward's u·A), float32 and float64 only. The rank-r products with the
// long dimension as output: the BLAS ran these well below its rate (and slower on two threads than on
// one at [512, 16]·[16, 1536]), so they run in pyfastpeft/rank_r_cpu.h's register tiles.
struct LoraExpandParams {
  const void* u;     // [n_rows, r]
  const void* V;     // [r, cols]
  const void* bias;  // [cols] or nullptr
  void* y;           // [n_rows, cols]
  int64_t n_rows, rank, cols;
  double scale;
  bool accumulate;
  DType dtype;
};

// C = s·Uᵀ·X [rank, cols], or its transpose [cols, rank] when `transposed` (dB = s·dyᵀ·xa), float32 and
// float64 only: the weight gradients' reduction over tokens, split between threads by columns.
struct LoraOuterParams {
  const void* U;  // [n_rows, r]
  const void* X;  // [n_rows, cols]
  void* C;        // [r, cols], or [cols, r] when transposed
  int64_t n_rows, rank, cols;
  double scale;
  bool transposed;
  DType dtype;
};

// y = s·x·M with M [cols, r] row-major (u = s·dy·B), float32 and float64 only.
struct LoraProjectParams {
  const void* x;  // [n_rows, cols]
  const void* M;  // [cols, r]
  void* y;        // [n_rows, r]
  int64_t n_rows, cols, rank;
  double scale;
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
