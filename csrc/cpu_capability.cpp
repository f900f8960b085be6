// Which copy of the CPU kernels runs (see pyfastpeft/cpu_dispatch.h). Compiled at the baseline.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "pyfastpeft/cpu_dispatch.h"

namespace pyfastpeft::cpu {
namespace {

// What the CPU can run. __builtin_cpu_supports reads CPUID and, for AVX and AVX-512, also whether the
// OS saves the wider register state (libgcc checks XCR0 through xgetbv), so a kernel with AVX-512
// disabled reports no AVX-512. Each level asks for every extension its -m flags enable.
bool cpu_runs(Capability level) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (level) {
    case Capability::Default: return true;
    case Capability::AVX2: return avx2;
    case Capability::AVX512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return level == Capability::Default;
#endif
}

Capability choose() {
  const char* env = std::getenv("PYFASTPEFT_CPU_CAPABILITY");
  const Capability best = best_capability();
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  for (int i = 0; i < kNumCapabilities; ++i) {
    const auto level = static_cast<Capability>(i);
    if (want != capability_name(level)) continue;
    TORCH_CHECK(capability_built(level), "PYFASTPEFT_CPU_CAPABILITY=", want,
                ": this build has no kernels for that level (built for this target: up to ",
                capability_name(best_capability_built()), "); unset it or choose a lower level");
    TORCH_CHECK(cpu_runs(level), "PYFASTPEFT_CPU_CAPABILITY=", want,
                ": this CPU cannot run that level (the best it runs is ", capability_name(best),
                "); unset it or choose a lower level");
    return level;
  }
  TORCH_CHECK_VALUE(false, "PYFASTPEFT_CPU_CAPABILITY=", want, ": expected one of default, avx2, avx512 (or unset)");
}

}  // namespace

const char* capability_name(Capability level) {
  switch (level) {
    case Capability::Default: return "default";
    case Capability::AVX2: return "avx2";
    case Capability::AVX512: return "avx512";
  }
  return "?";
}

bool capability_built(Capability level) {
  switch (level) {
    case Capability::Default: return true;
#if defined(PYFASTPEFT_CPU_BUILT_AVX2)
    case Capability::AVX2: return true;
#endif
#if defined(PYFASTPEFT_CPU_BUILT_AVX512)
    case Capability::AVX512: return true;
#endif
    default: return false;
  }
}

Capability best_capability_built() {
  Capability best = Capability::Default;
  for (int i = 0; i < kNumCapabilities; ++i) {
    if (capability_built(static_cast<Capability>(i))) best = static_cast<Capability>(i);
  }
  return best;
}

Capability best_capability() {
  Capability best = Capability::Default;
  for (int i = 0; i < kNumCapabilities; ++i) {
    const auto level = static_cast<Capability>(i);
    if (capability_built(level) && cpu_runs(level)) best = level;
  }
  return best;
}

bool capability_runnable(Capability level) { return capability_built(level) && cpu_runs(level); }

Capability capability() {
  // A bad setting throws here, and again on every later call (the static is set only on success).
  static const Capability chosen = choose();
  return chosen;
}

}  // namespace pyfastpeft::cpu
