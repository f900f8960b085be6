// Every pyfastpeft operator schema, in one place. Implementations register per dispatch key in
// csrc/ops/<family>/<family>_{cpu,cuda}.cpp; fake kernels are registered from Python
// (pyfastpeft/ops/<family>.py), and so is autograd, as torch.library.register_autograd rules over each
// op's C++ forward and `_backward` ops, with one exception: lora_linear, which a training step calls
// once per adapted projection (210 times on SmolLM2-135M), has a C++ Autograd kernel
// (csrc/ops/lora/lora_autograd.cpp) that saves ~0.15 ms of interpreter time per call
// (docs/architecture.md, Autograd).
#include <torch/library.h>

TORCH_LIBRARY(pyfastpeft, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};

  // ---- lora: fused LoRA linear (csrc/ops/lora) ----
  // Returns (y, xa, keep) with xa = drop(x)·Aᵀ [N, r] and keep the dropout mask as bits (uint8,
  // dropout_keep_bytes(N·in) bytes, pyfastpeft/philox.h) on the CPU when dropout_p > 0, else empty; both
  // saved for the backward.
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor? rng_state) -> (Tensor, Tensor, Tensor)",
        pt2);
  // Returns (dx, dW, db, dA, dB); entries whose output_mask is false are empty tensors. keep: the
  // forward's mask bits; None or empty: the mask is drawn again from rng_state.
  m.def("lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
        "float scaling, float dropout_p, Tensor? rng_state, Tensor? keep, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        pt2);

  // ---- dropout: the Philox mask every pyfastpeft dropout draws (csrc/ops/dropout) ----
  // x ⊙ mask / (1 - p); the mask of element i (row-major) depends only on (seed, offset, i) with
  // rng_state = [seed, offset] (see pyfastpeft/dropout.h), on the CPU and on CUDA alike.
  m.def("philox_dropout(Tensor x, float p, Tensor rng_state) -> Tensor", pt2);

  // ---- optim: multi-tensor AdamW and gradient norm (csrc/ops/optim) ----
  // One AdamW step over a list of tensors of one device and dtype, in place; each steps[i] (float32
  // scalar) is incremented first. Optional lists (max_exp_avg_sqs: amsgrad, masters: float32 master
  // weights, anchors: L2-SP reference θ₀) are empty or one per parameter. lr is a float64 scalar and
  // grad_scale a float32 scalar on the parameters' device, so a step can be captured in a CUDA graph.
  m.def("fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor[] anchors, Tensor(f!)[] steps, Tensor lr, "
        "Tensor? grad_scale, float beta1, float beta2, float eps, float weight_decay, float l2sp, bool maximize) -> ()",
        pt2);
  // sqrt(Σ x²) over every element of every tensor, as a float32 scalar on their device.
  m.def("multi_tensor_l2_norm(Tensor[] tensors) -> Tensor", pt2);

  // ---- sparse: W = W₀ + Δ with Δ non-zero at k sorted flat indices (csrc/ops/sparse) ----
  // dΔ_j = Σ_n grad_y[n, idx_j / in]·x[n, idx_j mod in]: the weight gradient at the k indices only.
  m.def("sampled_weight_grad(Tensor grad_y, Tensor x, Tensor indices, int in_features) -> Tensor", pt2);
  // y = x·(W₀ + Δ)ᵀ + b.
  m.def("sparse_delta_linear(Tensor x, Tensor weight, Tensor? bias, Tensor delta, Tensor indices) -> Tensor", pt2);
  // Returns (dx, dbias, ddelta); entries whose output_mask is false are empty tensors. W₀ gets no gradient.
  m.def("sparse_delta_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor delta, Tensor indices, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
        pt2);

  // ---- quant: fake quantization (csrc/ops/quant) ----
  // group_size: 0 per tensor, -1 per channel along axis, g > 0 groups of g along the last dimension.
  // Returns (out, scale, zero_point): scale float32 (float64 for float64 x), zero_point int32.
  m.def("fake_quantize(Tensor x, int bits, int group_size, bool symmetric, int axis) -> (Tensor, Tensor, Tensor)",
        pt2);
  // Straight-through estimator: grad_out where the recomputed code is inside [qmin, qmax], else 0.
  m.def("fake_quantize_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor zero_point, int bits, "
        "int group_size, int axis) -> Tensor",
        pt2);
  // Learnable scale (LSQ): quantize with the given scale and optional float zero point; grad_factor
  // scales the scale / zero-point gradients of the backward.
  m.def("fake_quantize_lsq(Tensor x, Tensor scale, Tensor? zero_point, int bits, int group_size, int axis, "
        "float grad_factor) -> Tensor",
        pt2);
  // Returns (grad_x, grad_scale, grad_zero_point); grad_x is empty when need_grad_x is false and
  // grad_zero_point is empty without a zero point.
  m.def("fake_quantize_lsq_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor? zero_point, int bits, "
        "int group_size, int axis, float grad_factor, bool need_grad_x) -> (Tensor, Tensor, Tensor)",
        pt2);

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
  // The plain cross-entropy of hidden·weightᵀ (a language model's head) against labels, mean over the
  // rows whose label is not ignore_index, chunked the same way: the logits are never whole. Returns
  // (loss, grad_hidden, grad_weight); entries whose output_mask is false are empty.
  m.def("fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, int chunk_size, "
        "bool[2] output_mask) -> (Tensor, Tensor, Tensor)",
        pt2);

  // ---- bias: BitFit linear, W frozen and only b trained (csrc/ops/bias) ----
  // y = x·Wᵀ + b; saves nothing of x (the backward needs only W).
  m.def("bias_only_linear(Tensor x, Tensor weight, Tensor bias) -> Tensor", pt2);
  // Returns (dx, db) = (dy·W, Σ_n dy[n, :]); entries whose output_mask is false are empty tensors.
  m.def("bias_only_linear_backward(Tensor grad_y, Tensor weight, bool[2] output_mask) -> (Tensor, Tensor)", pt2);

  // ---- ia3: (IA)³ feature scaling (csrc/ops/ia3) ----
  // y = x ⊙ scale over the last dimension (the input of a feed-forward linear or the output of a k/v one).
  m.def("ia3_scale(Tensor x, Tensor scale) -> Tensor", pt2);
  // Returns (dx, dscale) = (dy ⊙ scale, Σ_rows dy ⊙ x) in one pass; entries whose output_mask is false are
  // empty tensors.
  m.def("ia3_scale_backward(Tensor grad_y, Tensor x, Tensor scale, bool[2] output_mask) -> (Tensor, Tensor)", pt2);

  // ---- gguf: linear layers on GGUF (ggml) block-quantized weights (csrc/ops/gguf) ----
  // blocks: uint8 [rows, cols / 32 * block_bytes(qtype)], qtype 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0); the weight
  // is frozen and dequantized one block at a time inside the kernels, never as a whole.
  // y = x·dequant(W)ᵀ + b; the backward needs only the blocks (nothing of x is saved).
  m.def("gguf_linear(Tensor x, Tensor blocks, int qtype, int cols, Tensor? bias) -> Tensor", pt2);
  // dx = dy·dequant(W) (the bias gradient is dy's column sum, taken by the autograd rule).
  m.def("gguf_linear_backward(Tensor grad_y, Tensor blocks, int qtype, int cols) -> Tensor", pt2);
  m.def("gguf_dequantize(Tensor blocks, int qtype, int cols, ScalarType dtype) -> Tensor", pt2);
  // dequant(W)[ids]: only the looked-up rows are dequantized.
  m.def("gguf_embedding(Tensor ids, Tensor blocks, int qtype, int cols, ScalarType dtype) -> Tensor", pt2);
  // ggml's reference round-to-nearest quantization (quantize_row_*_ref), bit for bit.
  m.def("gguf_quantize(Tensor weight, int qtype) -> Tensor", pt2);
}
