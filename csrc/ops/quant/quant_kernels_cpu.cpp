// CPU kernels of the quant family (quant_kernels_cpu.h), compiled once per capability level (see
// pyfastpeft/cpu_dispatch.h).
#include "quant.h"
#include "quant_kernels_cpu.h"
#include "quant_kernels_cpu_table.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

template <typename T>
struct FakeQuantizeKernel {
  static void run(const FakeQuantParams& p) { quant_cpu::fake_quantize<T>(p); }
};
template <typename T>
struct ApplyKernel {
  static void run(const FakeQuantApplyParams& p) {
    quant_cpu::apply<T>(static_cast<const T*>(p.x), static_cast<T*>(p.out), static_cast<const acc_type<T>*>(p.scale),
                        p.zero_point, p.layout, p.qmin, p.qmax);
  }
};
template <typename T>
struct BackwardKernel {
  static void run(const FakeQuantBackwardParams& p) { quant_cpu::fake_quantize_backward<T>(p); }
};
template <typename T>
struct LsqBackwardKernel {
  static void run(const LsqBackwardParams& p) { quant_cpu::lsq_backward<T>(p); }
};

}  // namespace

constinit const QuantCpuKernels quant_cpu_kernels{
    &dispatch_dtype<FakeQuantizeKernel, FakeQuantParams>,
    &dispatch_dtype<ApplyKernel, FakeQuantApplyParams>,
    &dispatch_dtype<BackwardKernel, FakeQuantBackwardParams>,
    &dispatch_dtype<LsqBackwardKernel, LsqBackwardParams>,
};

}  // namespace pyfastpeft::CPU_CAPABILITY
