"""The [seed, offset] state every Philox-based op takes."""

from __future__ import annotations

import torch


def rng_state(seed: int | None, device: torch.device) -> torch.Tensor:
    """An int64 tensor ``[seed, offset]`` on ``device``.

    ``seed=None`` draws both from torch's generator (so ``torch.manual_seed`` makes runs repeatable);
    an explicit seed gives the same mask on every device.
    """
    if seed is None:
        return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
    if not isinstance(seed, int):
        raise ValueError(f"seed: expected an int or None, got {type(seed).__name__}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)
