"""``DistillationLoss``: the fused distillation loss as a module (see :mod:`pyfastpeft.ops.distill`)."""

from __future__ import annotations

import torch

from ..ops import distill as _ops


class DistillationLoss(torch.nn.Module):
    """``α·CE(student, labels) + (1 − α)·T²·D(teacher_T, student_T)``, mean over non-ignored tokens.

    Args:
        temperature: T > 0; both distributions are softened by T and the KD term is scaled by T².
        alpha: weight of the cross-entropy on the labels, in [0, 1] (0: pure distillation, no labels needed).
        divergence: ``"forward_kl"`` (KL(teacher‖student), Hinton et al.), ``"reverse_kl"``
            (KL(student‖teacher), mode-seeking) or ``"js"`` (Jensen-Shannon).
        ignore_index: label value of tokens left out of both terms and of the mean.
        chunk_size: rows per chunk for :meth:`from_hidden`; 0 picks about 2²³ logits per chunk, whole 32-row blocks.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        divergence: str = "forward_kl",
        ignore_index: int = -100,
        chunk_size: int = 0,
    ) -> None:
        super().__init__()
        _ops._check_options(divergence, temperature, alpha)
        if chunk_size < 0:
            raise ValueError(f"chunk_size: expected 0 (automatic) or a positive number of rows, got {chunk_size}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.ignore_index = int(ignore_index)
        self.chunk_size = int(chunk_size)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss from logits ``[..., V]`` (labels ``[...]``); the teacher logits get no gradient."""
        return _ops.kd_loss(
            student_logits,
            teacher_logits,
            labels,
            self.temperature,
            self.alpha,
            self.ignore_index,
            self.divergence,
        )

    def from_hidden(
        self,
        student_hidden: torch.Tensor,
        student_head_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss straight from the last hidden states and the output heads, never holding the full logits."""
        return _ops.fused_linear_kd_loss(
            student_hidden,
            student_head_weight,
            teacher_hidden,
            teacher_head_weight,
            labels,
            self.temperature,
            self.alpha,
            self.ignore_index,
            self.divergence,
            self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
            f"ignore_index={self.ignore_index}"
        )
