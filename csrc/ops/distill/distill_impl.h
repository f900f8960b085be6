// The distillation ops' composition, shared by the CPU and CUDA registrations: argument checks, the
// per-row kernel (Backend::rows) and, for the fused linear loss, the chunked head products through
// ATen's BLAS. `Backend` supplies:
//   static void rows(const KdLossParams&);
//   static bool any_bad_label(const at::Tensor& bad_label);   // int32 flag on the kernel's device
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

#include "distill.h"
#include "pyfastpeft/checks.h"

namespace pyfastpeft::distill {

inline Divergence parse_divergence(std::string_view name) {
  if (name == "forward_kl") return Divergence::ForwardKL;
  if (name == "reverse_kl") return Divergence::ReverseKL;
  if (name == "js") return Divergence::JS;
  TORCH_CHECK_VALUE(false, "divergence: expected 'forward_kl', 'reverse_kl' or 'js', got '", name, "'");
}

inline void check_scalars(double temperature, double alpha, const std::optional<at::Tensor>& labels) {
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature: expected a finite value > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha: expected a weight in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(labels.has_value() || alpha == 0.0,
                    "labels: required when alpha > 0 (the cross-entropy term needs them), got None with alpha=", alpha);
}

inline void check_labels(const std::optional<at::Tensor>& labels, int64_t n_rows, const at::Tensor& ref,
                         const char* ref_name) {
  if (!labels.has_value()) return;
  const at::Tensor& l = *labels;
  TORCH_CHECK_VALUE(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
                    "labels: expected an int64 or int32 tensor, got ", l.scalar_type());
  check_dim(l, "labels", 1);
  check_size(l, "labels", 0, n_rows, "one label per row");
  check_same_device(l, "labels", ref, ref_name);
}

// The kernels read int64 labels; int32 ones are widened (one small copy).
inline std::optional<at::Tensor> int64_labels(const std::optional<at::Tensor>& labels) {
  if (!labels.has_value()) return std::nullopt;
  return labels->to(at::kLong).contiguous();
}

// A view the kernels can read: unit stride along the vocabulary, any row stride.
inline at::Tensor rows_view(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

// Number of rows that count, as an int64 scalar on the data's device (no host round trip).
inline at::Tensor count_valid(const std::optional<at::Tensor>& labels, int64_t n_rows, int64_t ignore_index,
                              const at::Tensor& ref) {
  if (!labels.has_value()) return at::scalar_tensor(n_rows, ref.options().dtype(at::kLong));
  return at::sum(at::ne(*labels, ignore_index), at::kLong);
}

// float32 for the 16-bit types and float32, float64 for float64: per-row losses and the dW accumulator.
inline at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `t` null: no teacher (the plain cross-entropy of fused_linear_cross_entropy).
inline KdLossParams make_params(const at::Tensor& s, const at::Tensor* t, const std::optional<at::Tensor>& labels,
                                void* grad, at::Tensor& row_loss, const at::Tensor& n_valid, at::Tensor& bad,
                                int64_t ignore_index, double temperature, double alpha, Divergence divergence) {
  return KdLossParams{s.const_data_ptr(),
                      t != nullptr ? t->const_data_ptr() : nullptr,
                      labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr,
                      grad,
                      row_loss.mutable_data_ptr(),
                      n_valid.const_data_ptr<int64_t>(),
                      bad.mutable_data_ptr<int32_t>(),
                      s.size(0),
                      s.size(1),
                      s.stride(0),
                      t != nullptr ? t->stride(0) : 0,
                      ignore_index,
                      temperature,
                      alpha,
                      divergence,
                      to_dtype(s.scalar_type())};
}

template <class Backend>
void raise_on_bad_label(const at::Tensor& bad, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK_VALUE(!Backend::any_bad_label(bad), "labels: every label must be in [0, ", vocab,
                    ") (the vocabulary size) or equal ignore_index=", ignore_index);
}

// Returns (loss, grad_student): the mean loss as a 0-d tensor of the logits' dtype and, when
// compute_grad, d loss / d student_logits [N, V] (else an empty tensor).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> kd_loss(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                           const std::optional<at::Tensor>& labels, double temperature, double alpha,
                                           int64_t ignore_index, c10::string_view divergence, bool compute_grad) {
  const Divergence div = parse_divergence(std::string_view(divergence.data(), divergence.size()));
  check_scalars(temperature, alpha, labels);
  check_dim(student_logits, "student_logits", 2);
  check_dim(teacher_logits, "teacher_logits", 2);
  check_float(student_logits, "student_logits");
  check_same_dtype(teacher_logits, "teacher_logits", student_logits, "student_logits");
  check_same_device(teacher_logits, "teacher_logits", student_logits, "student_logits");
  TORCH_CHECK_VALUE(teacher_logits.size(1) == student_logits.size(1),
                    "teacher_logits: vocabulary size ", teacher_logits.size(1),
                    " does not match student_logits' vocabulary size ", student_logits.size(1));
  check_size(teacher_logits, "teacher_logits", 0, student_logits.size(0), "rows, from student_logits [N, V]");
  TORCH_CHECK_VALUE(student_logits.size(1) >= 1, "student_logits: expected a vocabulary of at least 1, got shape ",
                    student_logits.sizes());
  const int64_t n_rows = student_logits.size(0), vocab = student_logits.size(1);
  check_labels(labels, n_rows, student_logits, "student_logits");

  const at::Tensor s = rows_view(student_logits), t = rows_view(teacher_logits);
  const std::optional<at::Tensor> l = int64_labels(labels);
  const at::Tensor n_valid = count_valid(l, n_rows, ignore_index, s);
  at::Tensor grad = compute_grad ? at::empty({n_rows, vocab}, s.options()) : at::empty({0}, s.options());
  at::Tensor row_loss = at::empty({n_rows}, s.options().dtype(accumulate_dtype(s.scalar_type())));
  at::Tensor bad = at::zeros({1}, s.options().dtype(at::kInt));
  Backend::rows(make_params(s, &t, l, compute_grad ? grad.mutable_data_ptr() : nullptr, row_loss, n_valid, bad,
                            ignore_index, temperature, alpha, div));
  raise_on_bad_label<Backend>(bad, vocab, ignore_index);
  return {at::sum(row_loss).to(s.scalar_type()), grad};
}

// Rows per chunk when the caller passes chunk_size <= 0: about 2^23 logits per chunk whatever V is (the
// chunk buffers, student logits/gradient and teacher logits, are at most 32 MiB each in float32), whole
// 32-row blocks from 32 rows on. Each chunk streams the head's weight twice (logits, then dh), so fewer,
// taller chunks read it less; at V = 49,152, H = 576 and 512 rows on 2 threads, 85-row chunks took
// 194 ms and 128 or 160 rows 173-176 ms against 177 ms for the two bare products (64 rows: 217 ms).
inline int64_t default_chunk_rows(int64_t vocab) {
  const int64_t rows = (int64_t{1} << 23) / std::max<int64_t>(vocab, 1);
  return rows >= 32 ? rows / 32 * 32 : std::max<int64_t>(rows, 1);
}

// The chunk loop of both fused losses: logits = h·Wᵀ for `chunk` rows of student (and teacher) into
// buffers allocated once, the row kernel overwrites the student chunk with its gradient, then
// dh = g·W_s and dW_s += gᵀ·h. Without a teacher (null pointers) the loss is the plain cross-entropy.
// Returns (loss, dh, dW); a gradient whose output_mask entry is false is an empty tensor. The caller
// has checked the tensors.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_head_loss(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor* teacher_hidden,
    const at::Tensor* teacher_weight, const std::optional<at::Tensor>& labels, double temperature, double alpha,
    int64_t ignore_index, Divergence div, int64_t chunk_size, std::array<bool, 2> output_mask) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size: expected 0 (automatic) or a positive number of rows, got ",
                    chunk_size);
  const int64_t n_rows = student_hidden.size(0), hidden = student_hidden.size(1), vocab = student_weight.size(0);
  const int64_t chunk = chunk_size > 0 ? chunk_size : default_chunk_rows(vocab);
  const auto [need_dh, need_dw] = output_mask;
  const bool need_grad = need_dh || need_dw;
  const at::ScalarType dtype = student_hidden.scalar_type();
  // dW accumulates over chunks: in float32 for 16-bit weights, so the sum is rounded once, at the end.
  const at::ScalarType dw_dtype = accumulate_dtype(dtype);
  const std::optional<at::Tensor> l = int64_labels(labels);
  const at::Tensor n_valid = count_valid(l, n_rows, ignore_index, student_hidden);
  at::Tensor dh = need_dh ? at::empty({n_rows, hidden}, student_hidden.options()) : at::empty({0}, student_hidden.options());
  at::Tensor dw_acc = need_dw ? at::zeros({vocab, hidden}, student_weight.options().dtype(dw_dtype))
                              : at::empty({0}, student_weight.options());
  at::Tensor row_loss = at::empty({n_rows}, student_hidden.options().dtype(accumulate_dtype(dtype)));
  at::Tensor bad = at::zeros({1}, student_hidden.options().dtype(at::kInt));
  const at::Tensor ws_t = student_weight.t();
  // One logits buffer per side for every chunk (the last chunk uses the top rows of it).
  const int64_t buf_rows = std::min(chunk, n_rows);
  at::Tensor s_buf = at::empty({buf_rows, vocab}, student_hidden.options());
  at::Tensor t_buf = teacher_hidden != nullptr ? at::empty({buf_rows, vocab}, student_hidden.options()) : at::Tensor();

  for (int64_t r0 = 0; r0 < n_rows; r0 += chunk) {
    const int64_t n = std::min(chunk, n_rows - r0);
    const at::Tensor hs = student_hidden.narrow(0, r0, n);
    at::Tensor s = s_buf.narrow(0, 0, n);  // [n, V], becomes the gradient in place
    at::mm_out(s, hs, ws_t);
    at::Tensor t;
    if (teacher_hidden != nullptr) {
      t = t_buf.narrow(0, 0, n);
      at::mm_out(t, teacher_hidden->narrow(0, r0, n), teacher_weight->t());
    }
    at::Tensor loss_chunk = row_loss.narrow(0, r0, n);
    std::optional<at::Tensor> l_chunk = l.has_value() ? std::optional(l->narrow(0, r0, n)) : std::nullopt;
    Backend::rows(make_params(s, teacher_hidden != nullptr ? &t : nullptr, l_chunk,
                              need_grad ? s.mutable_data_ptr() : nullptr, loss_chunk, n_valid, bad, ignore_index,
                              temperature, alpha, div));
    if (need_dh) {
      at::Tensor dh_chunk = dh.narrow(0, r0, n);
      at::mm_out(dh_chunk, s, student_weight);
    }
    if (need_dw) {
      // .to() is a no-op for float32/float64; 16-bit chunks are widened for the float32 accumulator.
      const at::ScalarType acc = dw_acc.scalar_type();
      dw_acc.addmm_(s.t().to(acc), hs.to(acc));
    }
  }
  raise_on_bad_label<Backend>(bad, vocab, ignore_index);
  at::Tensor dw = need_dw ? dw_acc.to(student_weight.scalar_type()) : dw_acc;
  return {at::sum(row_loss), dh, dw};  // the loss in float32 (float64 for float64 inputs)
}

// Returns (loss, grad_student_hidden, grad_student_weight); a gradient whose output_mask entry is false
// is an empty tensor. Works chunk by chunk (chunked_head_loss).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_loss(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& labels, double temperature, double alpha,
    int64_t ignore_index, c10::string_view divergence, int64_t chunk_size, std::array<bool, 2> output_mask) {
  const Divergence div = parse_divergence(std::string_view(divergence.data(), divergence.size()));
  check_scalars(temperature, alpha, labels);
  check_dim(student_hidden, "student_hidden", 2);
  check_dim(student_weight, "student_weight", 2);
  check_dim(teacher_hidden, "teacher_hidden", 2);
  check_dim(teacher_weight, "teacher_weight", 2);
  check_float(student_hidden, "student_hidden");
  for (auto [x, name] : {std::pair{&student_weight, "student_weight"}, {&teacher_hidden, "teacher_hidden"},
                         {&teacher_weight, "teacher_weight"}}) {
    check_same_dtype(*x, name, student_hidden, "student_hidden");
    check_same_device(*x, name, student_hidden, "student_hidden");
  }
  const int64_t n_rows = student_hidden.size(0), hidden = student_hidden.size(1), vocab = student_weight.size(0);
  check_size(student_weight, "student_weight", 1, hidden, "hidden size, from student_hidden [N, H]");
  check_size(teacher_hidden, "teacher_hidden", 0, n_rows, "rows, from student_hidden [N, H]");
  check_size(teacher_weight, "teacher_weight", 1, teacher_hidden.size(1), "hidden size, from teacher_hidden [N, Ht]");
  TORCH_CHECK_VALUE(teacher_weight.size(0) == vocab, "teacher_weight: vocabulary size ", teacher_weight.size(0),
                    " does not match student_weight's vocabulary size ", vocab);
  TORCH_CHECK_VALUE(vocab >= 1, "student_weight: expected a vocabulary of at least 1, got shape ",
                    student_weight.sizes());
  check_labels(labels, n_rows, student_hidden, "student_hidden");
  auto [loss, dh, dw] = chunked_head_loss<Backend>(student_hidden, student_weight, &teacher_hidden, &teacher_weight,
                                                   labels, temperature, alpha, ignore_index, div, chunk_size,
                                                   output_mask);
  return {loss.to(student_hidden.scalar_type()), dh, dw};
}

// The plain cross-entropy of hidden·weightᵀ against labels, mean over the rows whose label is not
// ignore_index, chunked like fused_linear_kd_loss. Returns (loss, grad_hidden, grad_weight); the loss in
// float32 whatever the 16-bit dtype of hidden (float64 for float64), as transformers computes it.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy(const at::Tensor& hidden,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& labels,
                                                                          int64_t ignore_index, int64_t chunk_size,
                                                                          std::array<bool, 2> output_mask) {
  check_dim(hidden, "hidden", 2);
  check_dim(weight, "weight", 2);
  check_float(hidden, "hidden");
  check_same_dtype(weight, "weight", hidden, "hidden");
  check_same_device(weight, "weight", hidden, "hidden");
  check_size(weight, "weight", 1, hidden.size(1), "hidden size, from hidden [N, H]");
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight: expected a vocabulary of at least 1, got shape ", weight.sizes());
  check_labels(labels, hidden.size(0), hidden, "hidden");
  return chunked_head_loss<Backend>(hidden, weight, nullptr, nullptr, labels, 1.0, 1.0, ignore_index,
                                    Divergence::ForwardKL, chunk_size, output_mask);
}

}  // namespace pyfastpeft::distill
