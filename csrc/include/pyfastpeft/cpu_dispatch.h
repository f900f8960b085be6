// Runtime choice of the CPU kernels' instruction set, as ATen does it.
//
// Every `csrc/ops/<family>/<family>_kernels_cpu.cpp` is compiled once per capability level (see
// CMakeLists.txt), each copy with that level's -m flags and with CPU_CAPABILITY set to the level's name
// (DEFAULT, AVX2, AVX512), so its symbols live in pyfastpeft::DEFAULT, pyfastpeft::AVX2, ... and never
// collide. Each copy defines one constant table of function pointers; the family's `_cpu.cpp` glue
// (argument checks, allocation, registration: compiled once, at the baseline) calls through the table
// of the level chosen at load time:
//
//   // <family>_kernels_cpu.h
//   struct FooCpuKernels { void (*bar)(const BarParams&); };
//   PFP_DECLARE_CPU_KERNELS(FooCpuKernels, foo_cpu_kernels)
//   // <family>_kernels_cpu.cpp (per level)
//   namespace pyfastpeft::CPU_CAPABILITY {
//   constinit const FooCpuKernels foo_cpu_kernels{&bar_kernel};
//   }
//   // <family>_cpu.cpp (baseline)
//   foo_cpu_kernels().bar(params);
//
// The tables are constant-initialised (no code runs when the library loads), so an AVX-512 copy is
// never executed on a CPU without AVX-512.
#pragma once
#include <cstdint>

namespace pyfastpeft::cpu {

enum class Capability : int { Default = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kNumCapabilities = 3;

// "default", "avx2", "avx512"
const char* capability_name(Capability level);
// Whether this build contains the level's kernels (x86-64: all three; other targets: the default only).
bool capability_built(Capability level);
// The highest level this build contains.
Capability best_capability_built();
// Built, and this CPU (and its OS) can run it.
bool capability_runnable(Capability level);
// The highest level that this build contains and this CPU (and its OS) can run.
Capability best_capability();
// The level in use: PYFASTPEFT_CPU_CAPABILITY when set (default|avx2|avx512; a level this machine or
// this build cannot run is an error, never a silent fallback), else best_capability(). Read once.
Capability capability();

// The table of the level in use, from the levels' tables (null where a level is not built).
template <class Table>
const Table& select(const Table* default_level, const Table* avx2, const Table* avx512) {
  switch (capability()) {
    case Capability::AVX512: return *avx512;
    case Capability::AVX2: return *avx2;
    case Capability::Default: break;
  }
  return *default_level;
}

}  // namespace pyfastpeft::cpu

#if defined(PYFASTPEFT_CPU_BUILT_AVX2)
#define PFP_CPU_AVX2_TABLE(name) &::pyfastpeft::AVX2::name
#else
#define PFP_CPU_AVX2_TABLE(name) nullptr
#endif
#if defined(PYFASTPEFT_CPU_BUILT_AVX512)
#define PFP_CPU_AVX512_TABLE(name) &::pyfastpeft::AVX512::name
#else
#define PFP_CPU_AVX512_TABLE(name) nullptr
#endif

// Declares each level's table `name` of type `Table`, and `name()`: the table of the level in use.
// Use at namespace scope in pyfastpeft.
#define PFP_DECLARE_CPU_KERNELS(Table, name)                                                             \
  namespace DEFAULT {                                                                                    \
  extern const Table name;                                                                               \
  }                                                                                                      \
  namespace AVX2 {                                                                                       \
  extern const Table name;                                                                               \
  }                                                                                                      \
  namespace AVX512 {                                                                                     \
  extern const Table name;                                                                               \
  }                                                                                                      \
  inline const Table& name() {                                                                           \
    return ::pyfastpeft::cpu::select<Table>(&::pyfastpeft::DEFAULT::name, PFP_CPU_AVX2_TABLE(name),      \
                                            PFP_CPU_AVX512_TABLE(name));                                 \
  }
