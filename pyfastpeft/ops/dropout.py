"""Philox dropout: ``x ⊙ mask / (1 - p)`` with the counter-based mask every pyfastpeft op draws.

The mask of element ``i`` (row-major index) depends only on (seed, offset, i) and is the same on the CPU
and on CUDA (``csrc/include/pyfastpeft/philox.h``), so the LoRA ops' fused dropout and this op agree
element for element, and a backward regenerates the mask instead of saving it.
"""

from __future__ import annotations

import torch

from . import _rng
from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::philox_dropout")
def _philox_dropout_fake(x, p, rng_state):
    check_same_device("x", x, rng_state=rng_state)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _philox_dropout_setup_context(ctx, inputs, output):
    _, p, rng_state = inputs
    ctx.p = p
    ctx.save_for_backward(rng_state)


def _philox_dropout_backward(ctx, grad):
    # d(x ⊙ m / (1 − p)) / dx = m / (1 − p): the same mask, regenerated from the same [seed, offset].
    (rng_state,) = ctx.saved_tensors
    return _OP.philox_dropout(grad, ctx.p, rng_state), None, None


torch.library.register_autograd(
    "pyfastpeft::philox_dropout", _philox_dropout_backward, setup_context=_philox_dropout_setup_context
)


def philox_dropout(x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """``x ⊙ mask / (1 - p)`` with the Philox mask of every pyfastpeft op; differentiable in x (the
    backward regenerates the mask, nothing is saved but [seed, offset]).

    Args:
        x: float tensor, any shape and strides (the mask follows the row-major element index).
        p: drop probability in [0, 1).
        seed: None draws one from torch's generator; the same seed gives the same mask on every device
            and the mask :func:`pyfastpeft.ops.lora_linear` applies for that seed.
    """
    return _OP.philox_dropout(x, float(p), _rng.rng_state(seed, x.device))
