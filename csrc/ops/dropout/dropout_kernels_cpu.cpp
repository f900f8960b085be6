// CPU kernel of the dropout family (the Philox mask applied to one or two buffers), compiled once per
// capability level (see pyfastpeft/cpu_dispatch.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "dropout_kernels_cpu.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/philox_cpu.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

using cpu::kPhiloxGroup;

// out0 = in0 ⊙ mask·scale (and out1 = in1 ⊙ mask·scale), split on whole Philox groups so that each
// group's draw is made once whichever thread runs it.
template <typename T>
void dropout_apply_typed(const DropoutParams& p) {
  using acc_t = acc_type<T>;
  const uint64_t seed = static_cast<uint64_t>(p.rng_state[0]);
  const uint64_t offset = static_cast<uint64_t>(p.rng_state[1]);
  const uint32_t threshold = dropout_threshold(p.p);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const T* in0 = static_cast<const T*>(p.in0);
  const T* in1 = static_cast<const T*>(p.in1);
  T* out0 = static_cast<T*>(p.out0);
  T* out1 = static_cast<T*>(p.out1);
  const int64_t numel = p.numel;
  const int64_t n_groups = (numel + kPhiloxGroup - 1) / kPhiloxGroup;
  at::parallel_for(0, n_groups, 64, [&](int64_t begin, int64_t end) {
    acc_t keep[kPhiloxGroup];
    for (int64_t group = begin; group < end; ++group) {
      const int64_t e0 = group * kPhiloxGroup;
      const int64_t n = std::min<int64_t>(kPhiloxGroup, numel - e0);
      cpu::dropout_scale_range(e0, n, seed, offset, threshold, scale, keep);
      for (int64_t i = 0; i < n; ++i) out0[e0 + i] = static_cast<T>(static_cast<acc_t>(in0[e0 + i]) * keep[i]);
      if (in1 != nullptr) {
        for (int64_t i = 0; i < n; ++i) out1[e0 + i] = static_cast<T>(static_cast<acc_t>(in1[e0 + i]) * keep[i]);
      }
    }
  });
}

void dropout_apply(const DropoutParams& p) {
  switch (p.dtype) {
    case DType::Float64: return dropout_apply_typed<double>(p);
    case DType::Float32: return dropout_apply_typed<float>(p);
    case DType::BFloat16: return dropout_apply_typed<at::BFloat16>(p);
    case DType::Float16: return dropout_apply_typed<at::Half>(p);
  }
}

}  // namespace

constinit const DropoutCpuKernels dropout_cpu_kernels{&dropout_apply};

}  // namespace pyfastpeft::CPU_CAPABILITY
