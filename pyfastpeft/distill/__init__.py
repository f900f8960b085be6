"""Knowledge distillation: the loss module and a small training loop."""

from .loop import distill
from .loss import DistillationLoss

__all__ = ["DistillationLoss", "distill"]
