// Column sums over rows that do not depend on the thread count, for CPU kernels (the ia3 and bias
// families): the rows are cut into fixed slabs, each slab adds its rows into its own partial row (in
// the accumulation type), and the partial rows are then added in slab order.
#pragma once
#ifndef CPU_CAPABILITY
#error "kernel header: include it only from a *_kernels_cpu.cpp, which is compiled once per CPU level"
#endif
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pyfastpeft::cpu {
inline namespace CPU_CAPABILITY {  // one copy per CPU level (pyfastpeft/cpu_dispatch.h)

inline int64_t num_slabs(int64_t n_rows, int64_t rows_per_slab) {
  return std::max<int64_t>(1, (n_rows + rows_per_slab - 1) / rows_per_slab);
}

// fn(slab, first_row, rows) for every non-empty slab, slabs in parallel.
template <class F>
void for_each_slab(int64_t n_rows, int64_t rows_per_slab, F&& fn) {
  at::parallel_for(0, num_slabs(n_rows, rows_per_slab), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t r0 = s * rows_per_slab, rows = std::min(rows_per_slab, n_rows - r0);
      if (rows > 0) fn(s, r0, rows);
    }
  });
}

// out[j] = Σ_s partial[s·cols + j], summed in slab order.
template <typename acc_t, typename T>
void sum_slabs(const std::vector<acc_t>& partial, int64_t n_slabs, int64_t cols, T* out) {
  at::parallel_for(0, cols, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t total = 0;
      for (int64_t s = 0; s < n_slabs; ++s) total += partial[s * cols + j];
      out[j] = static_cast<T>(total);
    }
  });
}

// out[j] = Σ_n of what add_rows(first_row, rows, partial) adds into a slab's zeroed partial row.
template <typename acc_t, typename T, class AddRows>
void slab_column_sums(int64_t n_rows, int64_t cols, int64_t rows_per_slab, AddRows&& add_rows, T* out) {
  const int64_t n_slabs = num_slabs(n_rows, rows_per_slab);
  std::vector<acc_t> partial(n_slabs * cols, acc_t(0));
  for_each_slab(n_rows, rows_per_slab,
                [&](int64_t s, int64_t r0, int64_t rows) { add_rows(r0, rows, partial.data() + s * cols); });
  sum_slabs(partial, n_slabs, cols, out);
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastpeft::cpu
