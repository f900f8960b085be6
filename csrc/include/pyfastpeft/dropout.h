// Philox dropout, the one mask every pyfastpeft op draws: a torch-free params struct and the launchers
// that other families' glue calls to mask a buffer (csrc/ops/dropout/ implements them and registers the
// philox_dropout op).
//
//   out = in ⊙ keep(seed, offset, i) / (1 - p)       i: the element's index in the contiguous buffer
//
// keep(·) is the counter-based Philox draw of philox.h, identical on the CPU and in CUDA kernels, so a
// backward regenerates the forward's mask from rng_state = [seed, offset] instead of saving it. Kernels
// that fuse the mask into their own loops draw it with philox.h (CUDA) or philox_cpu.h (CPU) directly.
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

// out0 = in0 ⊙ mask / (1-p), and the same mask on the optional second pair (in1 → out1).
// All buffers are contiguous with `numel` elements; in-place (out == in) is allowed.
struct DropoutParams {
  const void* in0;
  void* out0;
  const void* in1;  // nullptr: no second pair
  void* out1;
  int64_t numel;
  float p;
  double scale;              // 1 / (1 - p)
  const int64_t* rng_state;  // [seed, offset], on the device the kernel runs on
  DType dtype;
};

// On the calling thread's CPU kernels (the capability level in use); buffers in host memory.
void dropout_apply_cpu(const DropoutParams& params);
// Enqueued on `stream`; buffers and rng_state in device memory. Throws std::runtime_error on a launch error.
void dropout_apply_cuda(const DropoutParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
