// CPU kernels of the multi-adapter family (pyfastpeft/rank_r_cpu.h), compiled once per capability level
// (see pyfastpeft/cpu_dispatch.h): the same vector-extension code becomes one AVX-512 register per
// 64-byte pack in the AVX-512 copy, two AVX2 registers in the AVX2 copy and four SSE2 ones in the default.
#include "multi_lora_kernels_cpu.h"
#include "pyfastpeft/rank_r_cpu.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

template <typename T>
constexpr RankROps<T> ops() {
  static_assert(64 % (rank_r::Pack<T>::lanes * sizeof(T)) == 0, "a padded rank is a whole number of vectors");
  static_assert(RankROps<T>::padded_rank(1) == rank_r::padded_rank<T>(1) &&
                    RankROps<T>::padded_rank(17) == rank_r::padded_rank<T>(17),
                "the glue pads the rank as the kernels do");
  return {&rank_r::transpose<T>, &rank_r::pack_At<T>, &rank_r::shrink<T>, &rank_r::expand<T>};
}

}  // namespace

constinit const MultiLoraCpuKernels multi_lora_cpu_kernels{ops<float>(), ops<double>()};

}  // namespace pyfastpeft::CPU_CAPABILITY
