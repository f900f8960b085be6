// Torch-free CUDA helpers: dtype dispatch over pyfastpeft::DType, float conversions, launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pyfastpeft/dtype.h"

namespace pyfastpeft::cuda {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type load_acc(const T* p) {
  return static_cast<typename Acc<T>::type>(*p);
}
template <>
__device__ __forceinline__ float load_acc<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <>
__device__ __forceinline__ float load_acc<__half>(const __half* p) {
  return __half2float(*p);
}

template <typename T>
__device__ __forceinline__ void store_from_acc(T* p, typename Acc<T>::type v) {
  *p = static_cast<T>(v);
}
template <>
__device__ __forceinline__ void store_from_acc<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store_from_acc<__half>(__half* p, float v) {
  *p = __float2half_rn(v);
}

// Throws with the kernel's name when a launch failed; the glue turns it into a Python RuntimeError.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pyfastpeft: CUDA launch of ") + kernel + " failed: " + cudaGetErrorString(err));
  }
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace pyfastpeft::cuda

// Runs the statement with `scalar_t` bound to the CUDA type of `dtype`.
#define PFP_CUDA_DISPATCH(dtype, ...)                               \
  switch (dtype) {                                                  \
    case ::pyfastpeft::DType::Float64: {                            \
      using scalar_t = double;                                      \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
    case ::pyfastpeft::DType::Float32: {                            \
      using scalar_t = float;                                       \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
    case ::pyfastpeft::DType::BFloat16: {                           \
      using scalar_t = __nv_bfloat16;                               \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
    case ::pyfastpeft::DType::Float16: {                            \
      using scalar_t = __half;                                      \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
  }
