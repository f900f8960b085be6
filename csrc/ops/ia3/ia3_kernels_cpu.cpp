// CPU kernel of the ia3 family (the backward pass, see ia3_cpu.cpp), compiled once per capability level
// (see pyfastpeft/cpu_dispatch.h).
#include <algorithm>
#include <cstdint>

#include "ia3_kernels_cpu.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/slab_reduce_cpu.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

// Rows per slab: at least 64, and at most 256 slabs (bounding the accumulation rows); depends only on the
// number of rows, which fixes the summation order of dl.
int64_t rows_per_slab(int64_t n_rows) { return std::max<int64_t>(64, (n_rows + 255) / 256); }

// Rows [0, rows) of one slab: dx = dy ⊙ l and acc += dy ⊙ x; the loop over j vectorizes.
template <typename T, typename A>
void scale_backward_rows(const T* dy, const T* x, const T* l, T* dx, A* acc, int64_t rows, int64_t cols,
                         int64_t dy_stride, int64_t x_stride, bool need_dx, bool need_dl) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* g = dy + n * dy_stride;
    if (need_dx) {
      T* out = dx + n * cols;
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<T>(static_cast<A>(g[j]) * static_cast<A>(l[j]));
    }
    if (need_dl) {
      const T* xr = x + n * x_stride;
      for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<A>(g[j]) * static_cast<A>(xr[j]);
    }
  }
}

template <typename scalar_t>
void scale_backward_typed(const Ia3BackwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const bool need_dx = p.dx != nullptr, need_dl = p.dl != nullptr;
  const int64_t n_rows = p.n_rows, cols = p.cols;
  const int64_t slab = rows_per_slab(n_rows);
  const scalar_t* dy_ptr = static_cast<const scalar_t*>(p.dy);
  const scalar_t* x_ptr = static_cast<const scalar_t*>(p.x);
  const scalar_t* l_ptr = static_cast<const scalar_t*>(p.l);
  scalar_t* dx_ptr = static_cast<scalar_t*>(p.dx);
  const int64_t dy_stride = p.dy_stride, x_stride = p.x_stride;
  const auto rows_of = [&](int64_t r0, int64_t rows, acc_t* acc) {
    scale_backward_rows(dy_ptr + r0 * dy_stride, x_ptr + r0 * x_stride, l_ptr, need_dx ? dx_ptr + r0 * cols : nullptr,
                        acc, rows, cols, dy_stride, x_stride, need_dx, need_dl);
  };
  if (need_dl) {
    cpu::slab_column_sums<acc_t>(n_rows, cols, slab, rows_of, static_cast<scalar_t*>(p.dl));
  } else {
    cpu::for_each_slab(n_rows, slab, [&](int64_t, int64_t r0, int64_t rows) { rows_of(r0, rows, nullptr); });
  }
}

void scale_backward(const Ia3BackwardParams& p) {
  switch (p.dtype) {
    case DType::Float64: return scale_backward_typed<double>(p);
    case DType::Float32: return scale_backward_typed<float>(p);
    case DType::BFloat16: return scale_backward_typed<at::BFloat16>(p);
    case DType::Float16: return scale_backward_typed<at::Half>(p);
  }
}

}  // namespace

constinit const Ia3CpuKernels ia3_cpu_kernels{&scale_backward};

}  // namespace pyfastpeft::CPU_CAPABILITY
