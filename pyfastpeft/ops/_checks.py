"""The device check of the fake kernels.

A call that mixes a meta tensor with CPU or CUDA tensors is dispatched to the fake kernel (Meta wins
the dispatch), so the device checks of the real kernels (csrc/include/pyfastpeft/checks.h) never run
for it; without this check such a call returned uninitialised tensors. Messages match the C++ ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Arg = torch.Tensor | Sequence[torch.Tensor] | None


def check_same_device(ref_name: str, ref: torch.Tensor, **others: Arg) -> None:
    """Raise ValueError unless every tensor in ``others`` (None skipped, lists walked) is on ``ref``'s device."""
    for name, value in others.items():
        if value is None:
            continue
        items = (
            [(name, value)] if isinstance(value, torch.Tensor) else [(f"{name}[{i}]", t) for i, t in enumerate(value)]
        )
        for item, t in items:
            if t.device != ref.device:
                raise ValueError(f"{item}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
