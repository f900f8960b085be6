// CPU kernel of the bias family (db's column sums, see bias_cpu.cpp), compiled once per capability
// level (see pyfastpeft/cpu_dispatch.h).
#include <cstdint>

#include "bias_kernels_cpu.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/slab_reduce_cpu.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

// Rows per column-sum slab: fixes the summation order of db.
constexpr int64_t kRows = 128;

// acc[o] += Σ_{n < rows} dy[n·row_stride + o]; the inner loop over o is independent per o, so it vectorizes.
template <typename T, typename A>
void add_column_sums(const T* dy, int64_t rows, int64_t cols, int64_t row_stride, A* acc) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* row = dy + n * row_stride;
    for (int64_t o = 0; o < cols; ++o) acc[o] += static_cast<A>(row[o]);
  }
}

template <typename T>
void column_sums_typed(const BiasColumnSumParams& p) {
  using acc_t = acc_type<T>;
  const T* dy_ptr = static_cast<const T*>(p.dy);
  const int64_t row_stride = p.row_stride, out = p.cols;
  cpu::slab_column_sums<acc_t>(
      p.n_rows, out, kRows,
      [&](int64_t r0, int64_t rows, acc_t* acc) { add_column_sums(dy_ptr + r0 * row_stride, rows, out, row_stride, acc); },
      static_cast<T*>(p.out));
}

void column_sums(const BiasColumnSumParams& p) {
  switch (p.dtype) {
    case DType::Float64: return column_sums_typed<double>(p);
    case DType::Float32: return column_sums_typed<float>(p);
    case DType::BFloat16: return column_sums_typed<at::BFloat16>(p);
    case DType::Float16: return column_sums_typed<at::Half>(p);
  }
}

}  // namespace

constinit const BiasCpuKernels bias_cpu_kernels{&column_sums};

}  // namespace pyfastpeft::CPU_CAPABILITY
