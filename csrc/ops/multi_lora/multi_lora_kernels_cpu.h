// The multi-adapter family's CPU kernels (the register-blocked rank-r products of
// pyfastpeft/rank_r_cpu.h), one table per capability level (see pyfastpeft/cpu_dispatch.h).
#pragma once
#include <cstdint>

#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft {

// rank_r::transpose, pack_At, shrink and expand for one element type (semantics in rank_r_cpu.h).
template <typename T>
struct RankROps {
  void (*transpose)(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst);
  void (*pack_At)(const T* A, int64_t rank, int64_t cols, T* At);
  void (*shrink)(const T* x, int64_t ldx, const int64_t* rows, int64_t n_rows, const T* At, int64_t cols, T* xa,
                 int64_t rank, T scale);
  void (*expand)(const T* xa, int64_t rank, const int64_t* rows, int64_t n_rows, const T* Bt, int64_t out_cols,
                 const T* bias, T s, T* y, bool accumulate);
  // Columns of the packed Aᵀ: the rank rounded up to whole 64-byte packs (the same at every level).
  static constexpr int64_t padded_rank(int64_t rank) {
    constexpr int64_t lanes = 64 / sizeof(T);
    return (rank + lanes - 1) / lanes * lanes;
  }
};

struct MultiLoraCpuKernels {
  RankROps<float> f32;
  RankROps<double> f64;
};
PFP_DECLARE_CPU_KERNELS(MultiLoraCpuKernels, multi_lora_cpu_kernels)

template <typename T>
const RankROps<T>& rank_r_ops() {
  if constexpr (sizeof(T) == sizeof(float)) {
    return multi_lora_cpu_kernels().f32;
  } else {
    return multi_lora_cpu_kernels().f64;
  }
}

}  // namespace pyfastpeft
