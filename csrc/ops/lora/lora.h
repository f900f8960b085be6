// Fused LoRA linear: torch-free parameter structs and launchers.
//
//   y  = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        x [N, in], W [out, in], A [r, in], B [out, r]
//   xa = drop(x)·Aᵀ                            saved for backward (N·r elements)
// Backward, with u = s·dy·B:
//   dx = dy·W + drop'(u·A)     dA = uᵀ·drop(x)     dB = s·dyᵀ·xa     db = Σ_n dy     dW = dyᵀ·x
// drop(·) multiplies by the Philox mask (see pyfastpeft/dropout.h) and 1/(1-p). drop(x) is never saved:
// the CPU forward keeps the mask as bits (N·in/8 bytes, `keep`) for the backward; on CUDA (and when no
// bits are passed) the backward regenerates the mask from rng_state = [seed, offset].
#pragma once
#include <cstdint>

#include "pyfastpeft/dropout.h"
#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

// CUDA: xa[n, j] = Σ_k drop(x)[n, k] · A[j, k], accumulated in float32 (float64 for float64 inputs).
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

// The forward's rank-r half on the CPU, in one pass over parts of rows: xa = drop(x)·Aᵀ, then
// y = bias + s·xa·Bᵀ on the same rows (the caller adds the frozen product x·Wᵀ to y afterwards).
struct LoraForwardRankParams {
  const void* x;     // [n_rows, in], contiguous
  const void* A;     // [r, in], contiguous
  const void* B;     // [out, r], contiguous
  const void* bias;  // [out] or nullptr
  void* xa;          // [n_rows, r]
  void* y;           // [n_rows, out]
  void* keep;        // the mask as bits for the backward, dropout_keep_bytes(n_rows·in) bytes, zeroed; or nullptr
  int64_t n_rows, in_features, out_features, rank;
  double scaling;
  float p;
  double scale;              // 1 / (1 - p)
  const int64_t* rng_state;  // nullptr when p == 0
  DType dtype;
};

// The backward's rank-r half on the CPU, in one pass over parts of rows, with u = s·dy·B per part:
//   dx = drop'(u·A)   (the LoRA part; the caller adds the frozen dy·W to it)
//   dA = uᵀ·drop(x)   dB = s·dyᵀ·xa
// sharing one draw of the mask; dA and dB are reduced from per-part sums in a fixed order. Any of
// dx, dA, dB may be nullptr when not needed; dB only for float32 and float64 (the glue computes a 16-bit
// dB as one product, whose float32 accumulation per-part sums in 16 bits would lose).
struct LoraBackwardRankParams {
  const void* dy;  // [n_rows, out], contiguous
  const void* x;   // [n_rows, in], contiguous
  const void* A;   // [r, in], contiguous
  const void* B;   // [out, r], contiguous
  const void* xa;  // [n_rows, r], contiguous
  void* dx;        // [n_rows, in] or nullptr
  void* dA;        // [r, in] or nullptr
  void* dB;        // [out, r] or nullptr
  const void* keep;  // the forward's mask as bits (LoraForwardRankParams::keep), or nullptr: drawn again
  int64_t n_rows, in_features, out_features, rank;
  double scaling;
  float p;
  double scale;
  const int64_t* rng_state;  // nullptr when p == 0
  DType dtype;
};

void lora_shrink_cuda(const LoraShrinkParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
