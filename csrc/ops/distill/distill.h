// Knowledge-distillation loss: torch-free parameter struct and launchers.
//
// Per row n of student logits s [N, V] and teacher logits t [N, V] (T = temperature, α = alpha):
//   z = s/T, u = t/T, ls = log_softmax(z), lt = log_softmax(u), ps = exp(ls), pt = exp(lt)
//   D = KL(pt‖ps) = Σ pt·(lt − ls)                      divergence "forward_kl"
//     = KL(ps‖pt) = Σ ps·(ls − lt)                      divergence "reverse_kl"
//     = ½KL(ps‖m) + ½KL(pt‖m), m = ½(ps + pt)           divergence "js"
//   row_loss = α·(logsumexp(s) − s[label]) + (1 − α)·T²·D
//   loss = Σ_valid row_loss / n_valid      (rows with label == ignore_index count for nothing)
// and, in the same row pass, the gradient of `loss` with respect to s:
//   ds = [α·(softmax(s) − onehot(label)) + (1 − α)·T·∂D/∂z] / n_valid
//   ∂D/∂z = ps − pt                                     forward KL
//         = ps ⊙ ((ls − lt) − D)                        reverse KL
//         = ps ⊙ (g − Σ ps·g), g = ½(ls − log m)        JS
// Without a teacher (teacher == nullptr: fused_linear_cross_entropy) the loss is the plain cross-entropy,
// alpha = 1 and temperature 1: row_loss = logsumexp(s) − s[label], ds = (softmax(s) − onehot(label)) / n_valid.
// Softmax statistics are kept in float32 (float64 for float64 inputs); nothing N×V is allocated
// besides the gradient itself, which may alias s (the fused linear loss overwrites its logits chunk).
#pragma once
#include <cstdint>

#include "pyfastpeft/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyfastpeft {

enum class Divergence : int { ForwardKL = 0, ReverseKL = 1, JS = 2 };

struct KdLossParams {
  const void* student;  // [n_rows, vocab], unit column stride, row stride student_stride
  const void* teacher;  // [n_rows, vocab], unit column stride, row stride teacher_stride; or nullptr
  const int64_t* labels;  // [n_rows] or nullptr (every row counts, alpha must be 0)
  void* grad;             // [n_rows, vocab] contiguous, or nullptr (no gradient); may equal student
  void* row_loss;         // [n_rows] float32 (float64 for Float64 inputs): row_loss / max(n_valid, 1)
  const int64_t* n_valid;  // scalar on the kernel's device: the rows that count (the mean's divisor)
  int32_t* bad_label;      // set to 1 when a label is outside [0, vocab) and not ignore_index
  int64_t n_rows, vocab, student_stride, teacher_stride;
  int64_t ignore_index;
  double temperature, alpha;
  Divergence divergence;
  DType dtype;
};

void kd_loss_rows_cpu(const KdLossParams& params);
void kd_loss_rows_cuda(const KdLossParams& params, cudaStream_t stream);

}  // namespace pyfastpeft
