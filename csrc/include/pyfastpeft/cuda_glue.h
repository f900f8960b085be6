// Helpers for the CUDA glue files (*_cuda.cpp), which see torch: the current stream, and kernel
// launchers' std::runtime_error turned into a c10 error that names the op.
#pragma once
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <stdexcept>

namespace pyfastpeft {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <class F>
void launch(const char* what, F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, what, ": ", e.what());
  }
}

}  // namespace pyfastpeft
