// Fake quantization: torch-free parameter structs, the shared scalar formulas and launchers.
//
// Every scheme sees x (contiguous) as [pre, C, post]; element (p, c, q) belongs to group c:
//   per tensor            [1, 1, numel]
//   per channel on axis a [prod(shape[:a]), shape[a], prod(shape[a+1:])]
//   groups of g (last dim) [1, numel / g, g]
// Per group c, with qmin = -2^(bits-1), qmax = 2^(bits-1) - 1 and acc = float (double for float64 x):
//   symmetric:  s = acc(amax / ((qmax - qmin) / 2)),                       z = 0
//   asymmetric: lo = min(min, 0), hi = max(max, 0)
//               s = acc((double(hi) - double(lo)) / (qmax - qmin)),         z = clamp(qmin - rint(acc(lo / s)), qmin, qmax)
//   s = max(s, float32 eps)                     (a zero-range group quantizes to exact zeros, never NaN)
//   q = rint(acc(x · acc(1 / s))) + z           (rint: round half to even, as PyTorch's quantizers)
//   out = (clamp(q, qmin, qmax) - z) · s        mask = qmin <= q <= qmax (the STE's pass-through set)
// A group holding NaN or ±inf gets s = NaN, z = 0 and an all-NaN output (and a zero STE gradient).
// These are exactly PyTorch's fake_quantize_per_{tensor,channel}_affine given (s, z), with the scale
// formula of its MinMax observers.
#pragma once
#include <cmath>
#include <cstdint>

#include "pyfastpeft/dtype.h"

#if defined(__CUDACC__)
#define PFP_QUANT_FN __host__ __device__ __forceinline__
#else
#define PFP_QUANT_FN inline
#endif


typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

struct QuantLayout {
  int64_t pre, channels, post;
  PFP_QUANT_FN int64_t numel() const { return pre * channels * post; }
};

// Forward with the scales computed in the kernel. scale: acc [C]; zero_point: int32 [C].
struct FakeQuantParams {
  const void* x;
  void* out;
  void* scale;
  int32_t* zero_point;
  QuantLayout layout;
  int qmin, qmax;
  bool symmetric;
  DType dtype;
};

// Forward with given scales (the learnable-scale path): out = fq(x; scale, zero_point).
struct FakeQuantApplyParams {
  const void* x;
  void* out;
  const void* scale;           // acc [C], already clamped to >= eps
  const int32_t* zero_point;   // int32 [C]
  QuantLayout layout;
  int qmin, qmax;
  DType dtype;
};

// STE backward: grad_x = grad_out · mask, the mask recomputed from x.
struct FakeQuantBackwardParams {
  const void* grad_out;
  const void* x;
  void* grad_x;
  const void* scale;
  const int32_t* zero_point;
  QuantLayout layout;
  int qmin, qmax;
  DType dtype;
};

// LSQ backward, per element with t = x·(1/s), r = rint(t), q = r + z:
//   qmin <= q <= qmax: dx = dy,  ds += dy·(r - t)
//   q < qmin:          dx = 0,   ds += dy·(qmin - z),  dz += -dy·s
//   q > qmax:          dx = 0,   ds += dy·(qmax - z),  dz += -dy·s
// ds and dz (acc [C]) are multiplied by grad_factor; grad_x may be nullptr (not needed).
struct LsqBackwardParams {
  const void* grad_out;
  const void* x;
  void* grad_x;
  const void* scale;
  const int32_t* zero_point;
  void* grad_scale;
  void* grad_zero_point;  // nullptr: symmetric (no zero point)
  QuantLayout layout;
  int qmin, qmax;
  double grad_factor;
  DType dtype;
};

constexpr float kQuantEps = 1.1920928955078125e-07f;  // torch.finfo(torch.float32).eps

// rint in the default rounding mode is round-half-to-even on the host and on the device.
template <typename acc_t>
PFP_QUANT_FN acc_t round_half_even(acc_t v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);
#endif
}

template <typename acc_t>
PFP_QUANT_FN acc_t clamp_code(acc_t q, acc_t qmin, acc_t qmax) {
  return q < qmin ? qmin : (q > qmax ? qmax : q);
}

// (scale, zero_point) of one group from its min, max and a probe that is NaN when the group held a
// non-finite value (the probe is Σ x·0).
template <typename acc_t>
PFP_QUANT_FN void group_qparams(acc_t lo, acc_t hi, acc_t probe, bool symmetric, int qmin, int qmax, acc_t* scale,
                                int32_t* zero_point) {
  if (probe != probe) {
    *scale = static_cast<acc_t>(NAN);
    *zero_point = 0;
    return;
  }
  lo = lo < acc_t(0) ? lo : acc_t(0);
  hi = hi > acc_t(0) ? hi : acc_t(0);
  acc_t s;
  int32_t z = 0;
  if (symmetric) {
    const acc_t amax = -lo > hi ? -lo : hi;
    s = static_cast<acc_t>(static_cast<double>(amax) / ((qmax - qmin) / 2.0));
  } else {
    s = static_cast<acc_t>((static_cast<double>(hi) - static_cast<double>(lo)) / static_cast<double>(qmax - qmin));
  }
  s = s > acc_t(kQuantEps) ? s : acc_t(kQuantEps);
  if (!symmetric) {
    const acc_t shift = round_half_even(static_cast<acc_t>(static_cast<double>(lo) / static_cast<double>(s)));
    z = static_cast<int32_t>(clamp_code(acc_t(qmin) - shift, acc_t(qmin), acc_t(qmax)));
  }
  *scale = s;
  *zero_point = z;
}

// 1/s rounded to acc, as PyTorch's kernels compute inv_scale.
template <typename acc_t>
PFP_QUANT_FN acc_t inverse_scale(acc_t s) {
  return static_cast<acc_t>(1.0 / static_cast<double>(s));
}

// workspace: fake_quantize_cuda_workspace_elements(layout) elements of the accumulation type (0: none).
int64_t fake_quantize_cuda_workspace_elements(const QuantLayout& layout);
void fake_quantize_cuda(const FakeQuantParams& params, void* workspace, cudaStream_t stream);
void fake_quantize_apply_cuda(const FakeQuantApplyParams& params, cudaStream_t stream);
void fake_quantize_backward_cuda(const FakeQuantBackwardParams& params, cudaStream_t stream);
// grad_scale / grad_zero_point are [splits, C] partials here; the glue sums them over splits.
void lsq_backward_cuda(const LsqBackwardParams& params, int64_t splits, cudaStream_t stream);
int64_t lsq_backward_cuda_splits(const QuantLayout& layout);

}  // namespace pyfastpeft
