"""Fused LoRA linear: ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``.

The op saves x, the rank-r product ``xa = dropout(x)·Aᵀ``, the dropout's [seed, offset] and, on the CPU,
the dropout mask as bits (N·in/8 bytes); on CUDA the backward regenerates the mask from the Philox stream.
"""

from __future__ import annotations

import math

import torch

from . import _rng
from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng_state):
    check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, rng_state=rng_state)
    n_rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    xa = x.new_empty((n_rows, lora_A.shape[0]))
    # the CPU kernels keep the dropout mask as bits for the backward (dropout_keep_bytes in philox.h)
    keep_bytes = (n_rows * x.shape[-1] + 7) // 8 + 8 if dropout_p > 0 and x.device.type == "cpu" else 0
    return y, xa, x.new_empty((keep_bytes,), dtype=torch.uint8)


@torch.library.register_fake("pyfastpeft::lora_linear_backward")
def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng_state, keep, output_mask):
    check_same_device(
        "x", x, grad_y=grad_y, weight=weight, lora_A=lora_A, lora_B=lora_B, xa=xa, rng_state=rng_state, keep=keep
    )

    def grad(mask: bool, like: torch.Tensor, shape) -> torch.Tensor:
        return like.new_empty(shape) if mask else like.new_empty((0,))

    need_dx, need_dW, need_db, need_dA, need_dB = output_mask
    return (
        grad(need_dx, x, x.shape),
        grad(need_dW, x, weight.shape),
        grad(need_db, x, (weight.shape[0],)),
        grad(need_dA, x, lora_A.shape),
        grad(need_dB, x, lora_B.shape),
    )


# The LoRA linear's autograd is a C++ Autograd kernel (csrc/ops/lora/lora_autograd.cpp): it is every
# training step's hot path, and the Python rule's interpreter time showed there (docs/architecture.md).


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """``x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ`` in one op, with a backward that saves no mask.

    Args:
        x: ``[..., in]`` input, any leading dimensions, any strides.
        weight: ``[out, in]`` base weight (usually frozen; its gradient is computed only when it requires grad).
        bias: ``[out]`` or None.
        lora_A: ``[r, in]``; lora_B: ``[out, r]``.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout on the LoRA branch's input, in [0, 1).
        seed: dropout seed; None draws one from torch's generator. The same seed gives the same mask on
            the CPU and on CUDA.
    """
    rng = _rng.rng_state(seed, x.device) if dropout_p > 0 else None
    y, _, _ = _OP.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), rng)
    return y
