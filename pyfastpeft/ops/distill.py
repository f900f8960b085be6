"""Knowledge-distillation loss: ``α·CE(student, labels) + (1 − α)·T²·D(teacher_T, student_T)``.

The forward kernel walks each row once (online softmax) and writes the gradient with respect to the
student logits in the same pass. Autograd saves that gradient and nothing else: neither the student nor
the teacher logits are kept alive by the graph, and no softmax or log-softmax intermediate is ever
materialised. The backward is ``grad_output · saved_gradient``; when ``grad_output`` is exactly 1 (the
loss is backpropagated as it is) the saved buffer itself is handed over, so forward plus backward hold
one N×V buffer beyond the inputs. A scaled loss (``(loss / k).backward()``) costs a second, transient
N×V buffer for the product.

The fused linear variant goes from the last hidden states: logits are computed ``chunk_size`` rows at a
time and their gradient is turned into ``dh = g·W`` and ``dW += gᵀ·h`` before the next chunk, so the
saved state is ``dh`` [N, H] and ``dW`` [V, H], never an N×V tensor.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft

DIVERGENCES = ("forward_kl", "reverse_kl", "js")


@torch.library.register_fake("pyfastpeft::kd_loss")
def _kd_loss_fake(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, divergence, compute_grad):
    check_same_device("student_logits", student_logits, teacher_logits=teacher_logits, labels=labels)
    grad_shape = student_logits.shape if compute_grad else (0,)
    return student_logits.new_empty(()), student_logits.new_empty(grad_shape)


@torch.library.register_fake("pyfastpeft::fused_linear_kd_loss")
def _fused_linear_kd_loss_fake(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    temperature,
    alpha,
    ignore_index,
    divergence,
    chunk_size,
    output_mask,
):
    check_same_device(
        "student_hidden",
        student_hidden,
        student_weight=student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        labels=labels,
    )
    need_dh, need_dw = output_mask
    dh = student_hidden.new_empty(student_hidden.shape if need_dh else (0,))
    dw = student_weight.new_empty(student_weight.shape if need_dw else (0,))
    return student_hidden.new_empty(()), dh, dw


@torch.library.register_fake("pyfastpeft::fused_linear_cross_entropy")
def _fused_linear_cross_entropy_fake(hidden, weight, labels, ignore_index, chunk_size, output_mask):
    check_same_device("hidden", hidden, weight=weight, labels=labels)
    need_dh, need_dw = output_mask
    dh = hidden.new_empty(hidden.shape if need_dh else (0,))
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return hidden.new_empty((), dtype=loss_dtype), dh, dw


def _is_traced(t: torch.Tensor) -> bool:
    """True under torch.compile/export/AOT tracing (an active dispatch mode, or a fake/functional/proxy
    tensor subclass), where a tensor's value cannot be read."""
    return (
        torch.compiler.is_compiling()
        or type(t) is not torch.Tensor
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._is_functional_tensor(t)
    )


def _scale(saved: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad_output · saved``, handing ``saved`` over unchanged when grad_output is exactly 1.

    Autograd never writes into an incoming gradient that something else still references (a retained
    graph keeps ``saved`` referenced, so accumulation copies it), which makes the hand-over safe. Under
    tracing the value is unknown and the product is always taken.
    """
    if not _is_traced(grad_output) and not _is_traced(saved) and bool(grad_output == 1):
        return saved
    return saved * grad_output


def _kd_setup_context(ctx, inputs, output):
    compute_grad = inputs[7]
    _, grad = output
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)
    # Otherwise autograd would build a zero N×V gradient for the non-differentiable second output.
    ctx.set_materialize_grads(False)


def _kd_backward(ctx, grad_loss, _grad_grad):
    if not ctx.compute_grad:
        raise RuntimeError("kd_loss: called with compute_grad=False, so there is no gradient to propagate")
    (grad,) = ctx.saved_tensors
    grad_student = None if grad_loss is None else _scale(grad, grad_loss)
    return grad_student, None, None, None, None, None, None, None


torch.library.register_autograd("pyfastpeft::kd_loss", _kd_backward, setup_context=_kd_setup_context)


def _head_loss_autograd(op: str, mask_index: int, n_inputs: int):
    """(setup_context, backward) of a fused head loss returning (loss, dh, dW): hidden and its head's
    weight are the first two inputs, ``inputs[mask_index]`` is the output_mask; the teacher's tensors
    (the KD loss's next two inputs) get no gradient."""

    def setup_context(ctx, inputs, output):
        ctx.output_mask = list(inputs[mask_index])
        _, dh, dw = output
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(dh, dw)
        ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable dh and dW

    def backward(ctx, grad_loss, _grad_dh, _grad_dw):
        dh, dw = ctx.saved_tensors
        need_dh, need_dw = ctx.output_mask
        needs = ctx.needs_input_grad
        if (needs[0] and not need_dh) or (needs[1] and not need_dw):
            raise RuntimeError(f"{op}: a gradient was requested that output_mask did not compute")
        if any(needs[2:]):
            raise RuntimeError(f"{op}: the teacher gets no gradient; pass detached teacher tensors")
        grad_h = _scale(dh, grad_loss) if needs[0] and grad_loss is not None else None
        grad_w = _scale(dw, grad_loss) if needs[1] and grad_loss is not None else None
        return (grad_h, grad_w) + (None,) * (n_inputs - 2)

    return setup_context, backward


for _op, _mask_index, _n_inputs in (("fused_linear_kd_loss", 10, 11), ("fused_linear_cross_entropy", 5, 6)):
    _setup, _backward = _head_loss_autograd(_op, _mask_index, _n_inputs)
    torch.library.register_autograd(f"pyfastpeft::{_op}", _backward, setup_context=_setup)


def _check_options(divergence: str, temperature: float, alpha: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")


def _check_common(divergence: str, temperature: float, alpha: float, labels: torch.Tensor | None) -> None:
    _check_options(divergence, temperature, alpha)
    if labels is None and alpha > 0:
        raise ValueError(
            f"labels: required when alpha > 0 (the cross-entropy term needs them), got None with alpha={alpha}"
        )


def _flat_labels(labels: torch.Tensor | None, lead_shape: torch.Size, what: str) -> torch.Tensor | None:
    if labels is None:
        return None
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels: expected shape {tuple(lead_shape)} (the leading dimensions of {what}), got {tuple(labels.shape)}"
        )
    return labels.reshape(-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
) -> torch.Tensor:
    """Distillation loss ``α·CE(s, labels) + (1 − α)·T²·D(softmax(t/T), softmax(s/T))``, mean over the
    tokens whose label is not ``ignore_index``.

    Args:
        student_logits: ``[..., V]``, float32, bfloat16 or float16 (float64 too); any strides.
        teacher_logits: ``[..., V]`` with the student's shape and dtype; treated as a constant.
        labels: ``[...]`` int64 or int32 targets, or None for pure distillation (then ``alpha`` must be 0 and every
            token counts).
        temperature: T > 0 softening both distributions; the KD term is scaled by T² (Hinton et al.).
        alpha: weight of the cross-entropy on the labels (at T = 1), in [0, 1].
        ignore_index: label of tokens that contribute nothing (neither term) and are left out of the mean.
        divergence: ``"forward_kl"`` KL(teacher‖student), ``"reverse_kl"`` KL(student‖teacher) or
            ``"js"`` Jensen-Shannon with the mixture ½(student + teacher).

    Returns a 0-d tensor of the logits' dtype. With every token ignored the loss is 0 (and so is its
    gradient).
    """
    _check_common(divergence, temperature, alpha, labels)
    if student_logits.dim() < 1 or teacher_logits.shape != student_logits.shape:
        if student_logits.dim() >= 1 and teacher_logits.shape[-1:] != student_logits.shape[-1:]:
            raise ValueError(
                f"teacher_logits: vocabulary size {teacher_logits.shape[-1]} does not match "
                f"student_logits' vocabulary size {student_logits.shape[-1]}"
            )
        raise ValueError(
            f"teacher_logits: expected the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError(
            f"student_logits: expected a vocabulary of at least 1, got shape {tuple(student_logits.shape)}"
        )
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    flat_labels = _flat_labels(labels, student_logits.shape[:-1], "student_logits")
    compute_grad = torch.is_grad_enabled() and s.requires_grad
    loss, _ = _OP.kd_loss(
        s, t, flat_labels, float(temperature), float(alpha), int(ignore_index), divergence, compute_grad
    )
    return loss


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    chunk_size: int = 0,
) -> torch.Tensor:
    """:func:`kd_loss` of ``student_hidden·student_head_weightᵀ`` against
    ``teacher_hidden·teacher_head_weightᵀ``, without ever holding the full logits.

    Args:
        student_hidden: ``[..., H]``; teacher_hidden: ``[..., Ht]`` with the same leading dimensions.
        student_head_weight: ``[V, H]``, gets a gradient when it requires grad;
        teacher_head_weight: ``[V, Ht]``, treated as a constant like ``teacher_hidden``.
        chunk_size: rows per chunk; 0 picks about 2²³ logits per chunk (independent of V), whole 32-row blocks.
        Other arguments: as in :func:`kd_loss`.
    """
    _check_common(divergence, temperature, alpha, labels)
    if student_hidden.dim() < 1 or teacher_hidden.dim() < 1 or student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden: expected the leading dimensions of student_hidden "
            f"{tuple(student_hidden.shape[:-1])}, got shape {tuple(teacher_hidden.shape)}"
        )
    if chunk_size < 0:
        raise ValueError(f"chunk_size: expected 0 (automatic) or a positive number of rows, got {chunk_size}")
    n_rows = math.prod(student_hidden.shape[:-1])  # reshape(-1, 0) cannot infer the rows of a 0-wide input
    hs = student_hidden.reshape(n_rows, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(n_rows, teacher_hidden.shape[-1])
    flat_labels = _flat_labels(labels, student_hidden.shape[:-1], "student_hidden")
    grad_on = torch.is_grad_enabled()
    mask = [grad_on and hs.requires_grad, grad_on and student_head_weight.requires_grad]
    loss, _, _ = _OP.fused_linear_kd_loss(
        hs,
        student_head_weight,
        ht,
        teacher_head_weight.detach(),
        flat_labels,
        float(temperature),
        float(alpha),
        int(ignore_index),
        divergence,
        int(chunk_size),
        mask,
    )
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 0,
) -> torch.Tensor:
    """``cross_entropy(hidden·weightᵀ, labels)``, mean over the tokens whose label is not ``ignore_index``,
    without ever holding the full logits: a language model's head and its loss in one op.

    The logits are made ``chunk_size`` rows at a time into one buffer, which the row kernel overwrites
    with their gradient (softmax − onehot) in the same pass that reads them; ``dh = g·W`` (and
    ``dW += gᵀ·h`` when ``weight`` requires grad) follow before the next chunk. Autograd saves ``dh``
    [N, H] (and ``dW``), never an N×V tensor: where the unfused head and loss hold the logits, their
    log-softmax and two gradients of that size (4 × 100 MB for 512 tokens of a 49k vocabulary in
    float32), this holds one chunk.

    Args:
        hidden: ``[..., H]`` last hidden states, float32, bfloat16 or float16 (float64 too).
        weight: ``[V, H]`` the head's weight (no bias), same dtype and device; gets a gradient when it
            requires grad.
        labels: ``[...]`` int64 or int32 targets in ``[0, V)`` or ``ignore_index``, one per row of ``hidden``
            (already shifted for next-token prediction).
        ignore_index: label of tokens left out of the loss and its mean.
        chunk_size: rows per chunk; 0 picks about 2²³ logits per chunk (independent of V), whole 32-row blocks.

    Returns a 0-d float32 tensor (float64 for float64 inputs): 16-bit logits' softmax statistics are
    float32, and so is the loss, as transformers computes it. With every token ignored the loss is 0
    (and so is its gradient).
    """
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape [V, {hidden.shape[-1]}] (the hidden size of hidden), got {tuple(weight.shape)}"
        )
    if chunk_size < 0:
        raise ValueError(f"chunk_size: expected 0 (automatic) or a positive number of rows, got {chunk_size}")
    if labels is None:
        raise ValueError("labels: required (one target per row of hidden), got None")
    n_rows = math.prod(hidden.shape[:-1])
    h = hidden.reshape(n_rows, hidden.shape[-1])
    flat_labels = _flat_labels(labels, hidden.shape[:-1], "hidden")
    grad_on = torch.is_grad_enabled()
    mask = [grad_on and h.requires_grad, grad_on and weight.requires_grad]
    loss, _, _ = _OP.fused_linear_cross_entropy(h, weight, flat_labels, int(ignore_index), int(chunk_size), mask)
    return loss
