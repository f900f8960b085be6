"""Multi-tensor optimizer ops: one in-place AdamW step over a tensor list, and the list's L2 norm.

``fused_adamw_`` mutates its ``(a!)`` arguments and has no autograd; the optimizer in
:mod:`pyfastpeft.optim` groups tensors by device and dtype and calls it once per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::fused_adamw_")
def _fused_adamw_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    masters,
    anchors,
    steps,
    lr,
    grad_scale,
    beta1,
    beta2,
    eps,
    weight_decay,
    l2sp,
    maximize,
):
    if params:
        check_same_device(
            "params[0]",
            params[0],
            params=params,
            grads=grads,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            max_exp_avg_sqs=max_exp_avg_sqs,
            masters=masters,
            anchors=anchors,
            steps=steps,
            lr=lr,
            grad_scale=grad_scale,
        )
    return None


@torch.library.register_fake("pyfastpeft::multi_tensor_l2_norm")
def _multi_tensor_l2_norm_fake(tensors):
    check_same_device("tensors[0]", tensors[0], tensors=tensors)
    return tensors[0].new_empty((), dtype=torch.float32)


def fused_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: torch.Tensor,
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_exp_avg_sqs: Sequence[torch.Tensor] = (),
    masters: Sequence[torch.Tensor] = (),
    anchors: Sequence[torch.Tensor] = (),
    l2sp: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    maximize: bool = False,
) -> None:
    """One AdamW step, in place, over tensors of one device and dtype (semantics: csrc/ops/optim/optim.h).

    ``steps[i]`` are float32 scalars incremented by the op; ``lr`` is a float64 scalar and ``grad_scale``
    a float32 scalar, both on the parameters' device. ``masters`` (float32 copies of bfloat16/float16
    parameters) carry the update when given; the parameters then receive their rounded values.
    """
    if not params:
        return
    _OP.fused_adamw_(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        list(masters),
        list(anchors),
        list(steps),
        lr,
        grad_scale,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        float(l2sp),
        bool(maximize),
    )


def multi_tensor_l2_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sqrt(Σ x²)`` over all elements of all tensors (one device, one dtype), a float32 scalar."""
    tensors = list(tensors)
    if not tensors:  # the dispatcher needs a tensor to pick a device
        raise ValueError("tensors: expected at least one tensor")
    return _OP.multi_tensor_l2_norm(tensors)
