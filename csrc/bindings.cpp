// The Python module pyfastpeft._C: loading it registers every operator (registration.cpp and the
// per-family TORCH_LIBRARY_IMPL blocks); it also tells what was built.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "pyfastpeft/cpu_dispatch.h"

namespace py = pybind11;

namespace {

// The CPU kernels' level in use, chosen on the first call; a bad PYFASTPEFT_CPU_CAPABILITY raises.
const char* cpu_capability_in_use() {
  try {
    return pyfastpeft::cpu::capability_name(pyfastpeft::cpu::capability());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

py::list cpu_levels(bool runnable_only) {
  namespace cpu = pyfastpeft::cpu;
  py::list out;
  for (int i = 0; i < cpu::kNumCapabilities; ++i) {
    const auto level = static_cast<cpu::Capability>(i);
    if (runnable_only ? cpu::capability_runnable(level) : cpu::capability_built(level)) {
      out.append(cpu::capability_name(level));
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastpeft compiled kernels; the operators live under torch.ops.pyfastpeft";
  m.def("build_info", [] {
    py::dict info;
#ifdef PYFASTPEFT_WITH_CUDA
    info["cuda_built"] = true;
#else
    info["cuda_built"] = false;
#endif
    info["cuda_archs"] = PYFASTPEFT_CUDA_ARCHS;
    info["torch_version"] = PYFASTPEFT_TORCH_VERSION;
    info["cpu_capability"] = cpu_capability_in_use();
    info["cpu_capabilities_built"] = cpu_levels(false);
    info["cpu_capabilities_runnable"] = cpu_levels(true);
    return info;
  });
  m.def("_cpu_capability", &cpu_capability_in_use);
}
