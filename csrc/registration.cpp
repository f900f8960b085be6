// Every pyfastpeft operator schema, in one place. Implementations register per dispatch key in
// csrc/ops/<family>/<family>_{cpu,cuda}.cpp; fake kernels and autograd are registered from Python
// (pyfastpeft/ops/<family>.py).
#include <torch/library.h>

TORCH_LIBRARY(pyfastpeft, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};

  // ---- lora: fused LoRA linear (csrc/ops/lora) ----
  // Returns (y, xa) with xa = drop(x)·Aᵀ [N, r], saved for the backward.
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor? rng_state) -> (Tensor, Tensor)",
        pt2);
  // Returns (dx, dW, db, dA, dB); entries whose output_mask is false are empty tensors.
  m.def("lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
        "float scaling, float dropout_p, Tensor? rng_state, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        pt2);
  // x ⊙ mask / (1 - p) with the Philox mask every pyfastpeft dropout uses (see philox.h).
  m.def("philox_dropout(Tensor x, float p, Tensor rng_state) -> Tensor", pt2);

  // ---- multi_lora: per-token multi-adapter LoRA linear (csrc/ops/multi_lora) ----
  // lora_A [K, r, in], lora_B [K, out, r], scalings [K], adapter_indices: one int per token, -1 = none.
  // Returns (y, xa) with xa = drop(x)·A[a(n)]ᵀ [N, r] in float32 (float64 for float64), saved for backward.
  m.def("multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scalings, "
        "Tensor adapter_indices, float dropout_p, Tensor? rng_state) -> (Tensor, Tensor)",
        pt2);
  // Returns (dx, dW, db, dA, dB); entries whose output_mask is false are empty tensors.
  m.def("multi_lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "Tensor scalings, Tensor adapter_indices, Tensor xa, float dropout_p, Tensor? rng_state, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        pt2);
}
