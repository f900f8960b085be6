// CPU kernels of the LoRA family and their registration.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "lora.h"
#include "lora_impl.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/philox.h"

namespace pyfastpeft {
namespace {

// out0 = in0 ⊙ mask·scale (and out1 = in1 ⊙ mask·scale): one Philox call yields the mask of 8
// consecutive elements, so the work is split on 8-element blocks.
template <typename T>
void dropout_apply_kernel(const DropoutParams& p) {
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
  const int64_t n_blocks = (numel + 7) / 8;
  at::parallel_for(0, n_blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const Philox4 words = philox4x32_10(static_cast<uint64_t>(block), offset, seed);
      const int64_t e0 = block * 8;
      const int lanes = static_cast<int>(std::min<int64_t>(8, numel - e0));
      acc_t keep[8];
      for (int lane = 0; lane < 8; ++lane) keep[lane] = philox_lane16(words, lane) >= threshold ? scale : acc_t(0);
      for (int lane = 0; lane < lanes; ++lane) {
        out0[e0 + lane] = static_cast<T>(static_cast<acc_t>(in0[e0 + lane]) * keep[lane]);
      }
      if (in1 != nullptr) {
        for (int lane = 0; lane < lanes; ++lane) {
          out1[e0 + lane] = static_cast<T>(static_cast<acc_t>(in1[e0 + lane]) * keep[lane]);
        }
      }
    }
  });
}

struct CpuBackend {
  static void dropout(const DropoutParams& params) { dropout_apply_cpu(params); }
  static at::Tensor shrink(const at::Tensor& x2, const at::Tensor& lora_A, double p, const int64_t* rng) {
    if (p == 0) return at::mm(x2, lora_A.t());
    const at::Tensor xc = x2.contiguous();
    at::Tensor xd = at::empty_like(xc);
    dropout_apply_cpu({xc.const_data_ptr(), xd.mutable_data_ptr(), nullptr, nullptr, xc.numel(),
                       static_cast<float>(p), 1.0 / (1.0 - p), rng, to_dtype(xc.scalar_type())});
    return at::mm(xd, lora_A.t());
  }
};

at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& rng_state) {
  check_float(x, "x");
  check_dropout_p(p);
  check_rng_state(rng_state, x, "x");
  return lora::dropout<CpuBackend>(x, p, rng_state);
}

}  // namespace

void dropout_apply_cpu(const DropoutParams& params) {
  switch (params.dtype) {
    case DType::Float64: return dropout_apply_kernel<double>(params);
    case DType::Float32: return dropout_apply_kernel<float>(params);
    case DType::BFloat16: return dropout_apply_kernel<at::BFloat16>(params);
    case DType::Float16: return dropout_apply_kernel<at::Half>(params);
  }
}

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("lora_linear", &lora::forward<CpuBackend>);
  m.impl("lora_linear_backward", &lora::backward<CpuBackend>);
  m.impl("philox_dropout", &philox_dropout_cpu);
}

}  // namespace pyfastpeft
