"""Dynamic freezing: blocks whose parameters have settled stop training.

Every ``window`` optimizer steps the scheduler measures each block's relative update over the window,
``‖θ_now − θ_window_start‖ / ‖θ_window_start‖`` (norms over all of the block's trainable tensors), and
freezes a block (``requires_grad = False``) once that stays below ``threshold`` for ``patience``
windows in a row. Autograd then skips the block's weight gradients (and the input gradients of every
block below the lowest trainable one). FusedAdamW drops a frozen tensor and frees its moments at its
next step, so no optimizer rebuild is needed; :meth:`FreezingScheduler.unfreeze` starts a block again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


class FreezingScheduler:
    """Freezes settled blocks. ``blocks`` maps a name to a module or to an iterable of parameters;
    call :meth:`step` once after every optimizer step."""

    def __init__(
        self,
        blocks: Mapping[str, nn.Module | Iterable[torch.Tensor]],
        threshold: float = 1e-3,
        window: int = 50,
        patience: int = 1,
    ) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold: expected a positive value, got {threshold}")
        if window < 1 or patience < 1:
            raise ValueError(f"window, patience: expected positive integers, got {window}, {patience}")
        self.threshold, self.window, self.patience = threshold, window, patience
        self.blocks: dict[str, list[torch.Tensor]] = {}
        for name, block in blocks.items():
            params = list(block.parameters()) if isinstance(block, nn.Module) else list(block)
            self.blocks[name] = [p for p in params if p.requires_grad]
        self.frozen: set[str] = set()
        self.history: dict[str, list[float]] = {name: [] for name in self.blocks}
        self._calm: dict[str, int] = dict.fromkeys(self.blocks, 0)
        self._snapshot: dict[str, list[torch.Tensor]] = {}
        self._steps = 0
        self._trainable_param_steps = 0  # Σ over steps of trainable parameters in the watched blocks
        self._frozen_param_steps = 0  # ... of those that were frozen
        self._take_snapshots(self.blocks)

    def _numel(self, name: str) -> int:
        return sum(p.numel() for p in self.blocks[name])

    def _take_snapshots(self, names: Iterable[str]) -> None:
        for name in names:
            self._snapshot[name] = [p.detach().clone() for p in self.blocks[name]]

    @torch.no_grad()
    def relative_update(self, name: str) -> float:
        """‖θ − θ_window_start‖ / ‖θ_window_start‖ for one block, now."""
        diff = sum(
            float((p.detach().float() - s.float()).pow(2).sum())
            for p, s in zip(self.blocks[name], self._snapshot[name], strict=True)
        )
        base = sum(float(s.float().pow(2).sum()) for s in self._snapshot[name])
        return (diff / max(base, 1e-30)) ** 0.5

    def step(self) -> list[str]:
        """Counts one optimizer step; at the end of a window, freezes the blocks that settled and returns
        their names."""
        self._steps += 1
        total = sum(self._numel(n) for n in self.blocks)
        frozen = sum(self._numel(n) for n in self.frozen)
        self._trainable_param_steps += total
        self._frozen_param_steps += frozen
        if self._steps % self.window:
            return []
        newly = []
        for name in self.blocks:
            if name in self.frozen:
                continue
            rel = self.relative_update(name)
            self.history[name].append(rel)
            self._calm[name] = self._calm[name] + 1 if rel < self.threshold else 0
            if self._calm[name] >= self.patience:
                self.freeze(name)
                newly.append(name)
        self._take_snapshots(n for n in self.blocks if n not in self.frozen)
        return newly

    def freeze(self, name: str) -> None:
        for p in self.blocks[name]:
            p.requires_grad_(False)
            p.grad = None
        self.frozen.add(name)
        self._snapshot.pop(name, None)

    def unfreeze(self, name: str | None = None) -> None:
        """Trains ``name`` (or every frozen block) again, with a fresh window."""
        for n in [name] if name is not None else list(self.frozen):
            if n not in self.blocks:
                raise ValueError(f"name: unknown block {n!r}; blocks are {sorted(self.blocks)}")
            for p in self.blocks[n]:
                p.requires_grad_(True)
            self.frozen.discard(n)
            self._calm[n] = 0
            self._take_snapshots([n])

    def report(self) -> dict:
        """Frozen blocks and the weight-gradient work skipped. A weight gradient costs one multiply-add per
        parameter per token, so ``saved_weight_grad_fraction`` (frozen parameter-steps over all
        parameter-steps of the watched blocks) is the fraction of that backward work skipped so far;
        input gradients skipped below the lowest trainable block come on top and are not counted."""
        return {
            "steps": self._steps,
            "frozen": sorted(self.frozen),
            "frozen_params": sum(self._numel(n) for n in self.frozen),
            "trainable_params": sum(self._numel(n) for n in self.blocks),
            # weight-gradient MACs skipped per token, summed over the steps
            "frozen_param_steps": self._frozen_param_steps,
            "saved_weight_grad_fraction": self._frozen_param_steps / max(self._trainable_param_steps, 1),
            "last_relative_update": {n: (h[-1] if h else None) for n, h in self.history.items()},
        }
