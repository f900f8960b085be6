// Multi-tensor AdamW and gradient norm: torch-free parameter structs and launchers.
//
// fused_adamw over a list of tensors i (all of one device and one param/state dtype pair):
//   step_i += 1;  t = step_i
//   g  = grad_i · grad_scale  (+ l2sp · (θ − θ₀))        grad_scale: clipping coefficient, or 1
//   g  = −g if maximize
//   θ  = θ · (1 − lr · weight_decay)                      decoupled weight decay
//   m  = β₁ m + (1 − β₁) g;   v = β₂ v + (1 − β₂) g²;    v̂ = max(v̂, v) if amsgrad
//   θ  = θ − lr / (1 − β₁ᵗ) · m / (√v(or v̂) / √(1 − β₂ᵗ) + eps)
// θ is the float32 master copy when masters are given (the parameter then receives round(θ)), else the
// parameter itself. Each tensor is read and written once per step: 7 streams for plain float32 AdamW.
//
// multi_tensor_l2_norm: sqrt(Σ_i Σ_e x_i[e]²) over a tensor list, accumulated in float64 on the CPU and
// in float32 on CUDA, written as one float32 scalar on the list's device.
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

// Host arrays of n_tensors device pointers each. Optional lists are nullptr when unused.
struct AdamWParams {
  int64_t n_tensors;
  void* const* param;                 // dtype param_dtype
  const void* const* grad;            // dtype param_dtype
  void* const* exp_avg;               // dtype state_dtype
  void* const* exp_avg_sq;            // dtype state_dtype
  void* const* max_exp_avg_sq;        // nullptr unless amsgrad; dtype state_dtype
  void* const* master;                // nullptr unless master weights; float32 (state_dtype)
  const void* const* anchor;          // nullptr unless l2sp != 0; dtype state_dtype (θ₀)
  float* const* step;                 // one float32 counter per tensor, incremented by the op
  const int64_t* numel;               // host array
  const double* lr;                   // device scalar
  const float* grad_scale;            // device scalar or nullptr
  double beta1, beta2, eps, weight_decay, l2sp;
  bool maximize;
  DType param_dtype;
  DType state_dtype;  // == param_dtype, or Float32 with master weights
};

struct L2NormParams {
  int64_t n_tensors;
  const void* const* data;
  const int64_t* numel;
  DType dtype;
  float* out;  // one scalar on the device
};

void fused_adamw_cpu(const AdamWParams& params);
void multi_tensor_l2_norm_cpu(const L2NormParams& params);

// workspace: at least multi_tensor_l2_norm_workspace() floats on the device.
void fused_adamw_cuda(const AdamWParams& params, cudaStream_t stream);
int64_t multi_tensor_l2_norm_workspace(const L2NormParams& params);
void multi_tensor_l2_norm_cuda(const L2NormParams& params, float* workspace, cudaStream_t stream);

}  // namespace pyfastpeft
