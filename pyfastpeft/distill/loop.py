"""``distill(teacher, student, data)``: a minimal distillation training loop.

Each step runs the teacher without autograd, the student with it, and one optimizer step on the
:class:`DistillationLoss`. The teacher may be a separate model or, with ``teacher=None``, the student's
own base model with its adapters disabled (any model exposing a ``disable_adapter()`` context manager,
as PEFT models do), so a single copy of the base weights serves both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .loss import DistillationLoss


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise ValueError(f"model output: expected a logits tensor or an object with .logits, got {type(output).__name__}")


def _split_batch(batch: Any) -> tuple[tuple, dict, torch.Tensor | None]:
    """(positional inputs, keyword inputs, labels) of a batch: a dict with an optional "labels" key, an
    (inputs, labels) pair, or a bare input tensor."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), {}, batch[1]
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    raise ValueError(
        f"data: expected batches that are dicts, (inputs, labels) pairs or tensors, got {type(batch).__name__}"
    )


@contextlib.contextmanager
def _as_teacher(model: torch.nn.Module, disable_adapters: bool):
    """Eval mode (and adapters off) for the teacher's forward, restoring the training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if disable_adapters else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def distill(
    teacher: torch.nn.Module | None,
    student: torch.nn.Module,
    data: Iterable,
    *,
    loss: DistillationLoss | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    epochs: int = 1,
    max_steps: int | None = None,
    shift_labels: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Trains ``student`` to match ``teacher`` on ``data`` and returns the loss of every step.

    Args:
        teacher: frozen model run under ``torch.no_grad()`` in eval mode; None uses ``student`` itself
            inside its ``disable_adapter()`` context (the same base model without its adapters).
        student: the model being trained; only its parameters with ``requires_grad`` are optimised, so
            any PEFT method (adapters, LoRA, prompt tuning, a frozen base) works unchanged.
        data: iterable of batches (dicts with an optional ``"labels"`` key, ``(inputs, labels)`` pairs, or
            input tensors); both models are called on the same inputs and must return logits ``[..., V]``
            (a tensor, or an output with ``.logits``).
        loss: the loss (default: ``DistillationLoss()``; with batches lacking labels use ``alpha=0``).
        optimizer: default AdamW(lr) over the student's trainable parameters.
        epochs, max_steps: passes over ``data``, and an optional cap on the number of steps.
        shift_labels: causal-LM alignment: logits at position i are scored against labels at i + 1.
        on_step: called as ``on_step(step, loss)`` after every step.
    """
    loss_fn = loss if loss is not None else DistillationLoss()
    if teacher is None and not hasattr(student, "disable_adapter"):
        raise ValueError("teacher: None needs a student with a disable_adapter() context manager (a PEFT model)")
    if teacher is student:
        raise ValueError("teacher: pass None to use the student's base model with its adapters disabled")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("student: has no parameter that requires grad, so there is nothing to train")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr)
    if epochs < 1:
        raise ValueError(f"epochs: expected at least 1, got {epochs}")

    student.train()
    losses: list[float] = []
    for _ in range(epochs):
        for batch in data:
            args, kwargs, labels = _split_batch(batch)
            with torch.no_grad():
                if teacher is None:
                    with _as_teacher(student, disable_adapters=True):
                        teacher_logits = _logits(student(*args, **kwargs))
                else:
                    with _as_teacher(teacher, disable_adapters=False):
                        teacher_logits = _logits(teacher(*args, **kwargs))
            student_logits = _logits(student(*args, **kwargs))
            if shift_labels:
                student_logits = student_logits[..., :-1, :]
                teacher_logits = teacher_logits[..., :-1, :]
                labels = None if labels is None else labels[..., 1:]
            step_loss = loss_fn(student_logits, teacher_logits, labels)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            losses.append(float(step_loss.detach()))
            if on_step is not None:
                on_step(len(losses), losses[-1])
            if max_steps is not None and len(losses) >= max_steps:
                return losses
    return losses
