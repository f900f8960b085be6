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

  // ---- distill: knowledge-distillation loss (csrc/ops/distill) ----
  // Returns (loss, grad_student): the mean loss and, when compute_grad, d loss / d student_logits made in
  // the same row pass (an empty tensor otherwise). divergence: 'forward_kl', 'reverse_kl' or 'js'.
  m.def("kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, float temperature, float alpha, "
        "int ignore_index, str divergence, bool compute_grad) -> (Tensor, Tensor)",
        pt2);
  // The same loss from the last hidden states, chunked over rows so the logits are never whole. Returns
  // (loss, grad_student_hidden, grad_student_weight); entries whose output_mask is false are empty.
  m.def("fused_linear_kd_loss(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
        "Tensor teacher_weight, Tensor? labels, float temperature, float alpha, int ignore_index, str divergence, "
        "int chunk_size, bool[2] output_mask) -> (Tensor, Tensor, Tensor)",
        pt2);
}
