// GGUF (ggml) block formats: torch-free parameter structs, the per-block formulas shared by the CPU and
// CUDA kernels, and the CUDA launchers.
//
// A weight [rows, cols] (cols % 32 == 0) is stored as uint8 [rows, cols / 32 · block_bytes], each row's
// blocks in column order, byte for byte as in a GGUF file's tensor data (little-endian fp16):
//   Q4_0 (type 2), 18 bytes: fp16 d, 16 bytes of nibbles    w = d · (q - 8)
//   Q4_1 (type 3), 20 bytes: fp16 d, fp16 m, 16 bytes       w = d · q + m
//   Q8_0 (type 8), 34 bytes: fp16 d, 32 int8 codes          w = d · q
// In the nibble formats weight j < 16 of a block is the low nibble of byte j and weight j + 16 its high
// nibble. d · q is exact in float32 (11-bit d times a code of at most 8 bits), so a float32 dequantized
// weight is exact for Q4_0 and Q8_0 and rounded once (the + m) for Q4_1, identical to ggml's and to the
// gguf package's dequantization.
#pragma once
#include <cmath>
#include <cstdint>

#include "pyfastpeft/dtype.h"

#if defined(__CUDACC__)
#define PFP_GGUF_FN __host__ __device__ __forceinline__
#else
#define PFP_GGUF_FN inline
#endif

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

constexpr int kGGUFQ4_0 = 2, kGGUFQ4_1 = 3, kGGUFQ8_0 = 8;
constexpr int64_t kGGUFBlock = 32;  // weights per block, along cols

// Bytes of one block of `qtype`; 0 for a type this family does not handle.
PFP_GGUF_FN int64_t gguf_block_bytes(int64_t qtype) {
  return qtype == kGGUFQ4_0 ? 18 : qtype == kGGUFQ4_1 ? 20 : qtype == kGGUFQ8_0 ? 34 : 0;
}

// y [tokens, rows] = x [tokens, cols] · dequant(W)ᵀ + bias; x, y contiguous, bias [rows] or nullptr.
struct GGUFLinearParams {
  const void* x;
  const uint8_t* blocks;
  const void* bias;
  void* y;
  int64_t tokens, rows, cols;
  int qtype;
  DType dtype;
};

// grad_x [tokens, cols] = grad_y [tokens, rows] · dequant(W); both contiguous.
struct GGUFLinearBackwardParams {
  const void* grad_y;
  const uint8_t* blocks;
  void* grad_x;
  int64_t tokens, rows, cols;
  int qtype;
  DType dtype;
};

// out [n_ids, cols] = dequant(W)[ids]; ids already checked to lie in [0, rows). With ids == nullptr the
// i-th output row is row i (the whole dequantization, n_ids == rows).
struct GGUFRowsParams {
  const int64_t* ids;
  const uint8_t* blocks;
  void* out;
  int64_t n_ids, rows, cols;
  int qtype;
  DType dtype;
};

// blocks [rows, cols / 32 · block_bytes] = quantize(weight [rows, cols]); weight contiguous.
struct GGUFQuantizeParams {
  const void* weight;
  uint8_t* blocks;
  int64_t rows, cols;
  int qtype;
  DType dtype;
};

// One block's codes from its 32 float32 values, as ggml's quantize_row_*_ref (and the gguf package's
// numpy port, bit for bit): the scale is computed in float32, its reciprocal scales the values, and the
// fp16 rounding of d (and m) happens only when it is stored. Writes the codes after the block's header
// (qs: 16 nibble bytes or 32 int8 codes) and returns d (and *m for Q4_1) in float32 for the caller to
// store as fp16. Each product is formed in double and rounded to float32 once, so a compiler that fuses
// a multiply and an add (FMA contraction) cannot change a code: the result is the separately rounded
// float32 product and sum that numpy computes.
PFP_GGUF_FN float gguf_mul_f32(float a, float b) { return static_cast<float>(static_cast<double>(a) * b); }

PFP_GGUF_FN float gguf_quantize_block(int qtype, const float* v, uint8_t* qs, float* m) {
  if (qtype == kGGUFQ8_0) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < 32; ++j) {
      const float q = roundf(gguf_mul_f32(v[j], id));  // half away from zero, as ggml's roundf
      qs[j] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
    return d;
  }
  if (qtype == kGGUFQ4_0) {
    float amax = 0.0f, max = 0.0f;  // the value of largest magnitude, the first one on a tie
    for (int j = 0; j < 32; ++j) {
      if (amax < fabsf(v[j])) amax = fabsf(v[j]), max = v[j];
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t q[32];
    for (int j = 0; j < 32; ++j) {
      const int c = static_cast<int>(gguf_mul_f32(v[j], id) + 8.5f);  // truncation, as the reference
      q[j] = static_cast<uint8_t>(c < 15 ? (c > 0 ? c : 0) : 15);
    }
    for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
    return d;
  }
  // Q4_1
  float lo = v[0], hi = v[0];
  for (int j = 1; j < 32; ++j) lo = v[j] < lo ? v[j] : lo, hi = v[j] > hi ? v[j] : hi;
  const float d = (hi - lo) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  uint8_t q[32];
  for (int j = 0; j < 32; ++j) {
    const int c = static_cast<int>(gguf_mul_f32(v[j] - lo, id) + 0.5f);
    q[j] = static_cast<uint8_t>(c < 15 ? (c > 0 ? c : 0) : 15);
  }
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
  *m = lo;
  return d;
}

// Code j (0..31) of a block's payload qs (after the fp16 header) as a number: Q4_0 q - 8, Q4_1 q,
// Q8_0 the signed byte.
PFP_GGUF_FN int gguf_code(int qtype, const uint8_t* qs, int j) {
  if (qtype == kGGUFQ8_0) return static_cast<int8_t>(qs[j]);
  const int q = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
  return qtype == kGGUFQ4_0 ? q - 8 : q;
}

void gguf_linear_cuda(const GGUFLinearParams& params, cudaStream_t stream);
void gguf_linear_backward_cuda(const GGUFLinearBackwardParams& params, cudaStream_t stream);
void gguf_rows_cuda(const GGUFRowsParams& params, cudaStream_t stream);
void gguf_quantize_cuda(const GGUFQuantizeParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
