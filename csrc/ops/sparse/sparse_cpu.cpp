// CPU glue of the sparse family: the ops' checks, allocation and registration. The kernel
// (sparse_kernels_cpu.cpp, compiled once per CPU capability level) runs through sparse_cpu_kernels().
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "sparse.h"
#include "sparse_impl.h"
#include "sparse_kernels_cpu.h"

namespace pyfastpeft {
namespace {

struct CpuBackend {
  static void check_indices(const at::Tensor& indices, int64_t numel) { sparse::check_indices_host(indices, numel); }

  static at::Tensor sampled_grad(const at::Tensor& gy2, const at::Tensor& x2, const at::Tensor& indices,
                                 int64_t in_features) {
    const at::Tensor gy = gy2.contiguous(), x = x2.contiguous(), idx = indices.contiguous();
    at::Tensor out = at::empty({idx.numel()}, x2.options());
    const SampledGradParams params{gy.const_data_ptr(), x.const_data_ptr(), idx.const_data_ptr(),
                                   idx.scalar_type() == at::kInt, out.mutable_data_ptr(), x.size(0),
                                   in_features, gy.size(1), idx.numel(), to_dtype(x.scalar_type())};
    sampled_weight_grad_cpu(params);
    return out;
  }
};

}  // namespace

void sampled_weight_grad_cpu(const SampledGradParams& p) { sparse_cpu_kernels().sampled_grad(p); }

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("sampled_weight_grad", &sparse::sampled_weight_grad<CpuBackend>);
  m.impl("sparse_delta_linear", &sparse::forward<CpuBackend>);
  m.impl("sparse_delta_linear_backward", &sparse::backward<CpuBackend>);
}

}  // namespace pyfastpeft
