// The Python module pyfastpeft._C: loading it registers every operator (registration.cpp and the
// per-family TORCH_LIBRARY_IMPL blocks); it also tells what was built.
#include <pybind11/pybind11.h>

namespace py = pybind11;

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
    return info;
  });
}
