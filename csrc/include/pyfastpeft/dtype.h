// Torch-free element types, so kernel headers and .cu files never need ATen.
#pragma once

namespace pyfastpeft {

enum class DType { Float64, Float32, BFloat16, Float16 };

}  // namespace pyfastpeft
