"""AdamW for sparse fine-tuning: the trainable tensors are the k-sized ``delta`` vectors of
SparseDeltaLinear, so every moment is k-sized; :meth:`SparseAdamW.reindex_` carries moments across a
regrowth of the selected entries."""

from __future__ import annotations

import torch

from .fused_adamw import FusedAdamW


class SparseAdamW(FusedAdamW):
    """FusedAdamW (same arguments) with state that follows a re-selection of sparse entries."""

    @torch.no_grad()
    def reindex_(self, param: torch.Tensor, source: torch.Tensor) -> None:
        """After ``param`` was rebuilt from old entries, moves its state: entry i of every per-element
        state tensor takes old entry ``source[i]``, or zero where ``source[i] < 0`` (a new entry). The
        step count is kept."""
        state = self.state.get(param)
        if not state:
            return
        if source.dim() != 1 or source.numel() != param.numel():
            raise ValueError(
                f"source: expected {param.numel()} entries (the new size of param), got {tuple(source.shape)}"
            )
        src = source.to(param.device).long()
        new = src >= 0
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step" and value.dim() > 0:
                moved = value.view(-1)[src.clamp(min=0)]
                state[key] = torch.where(new, moved, torch.zeros((), dtype=value.dtype, device=value.device))

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, step counts, masters, anchors)."""
        return sum(
            t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
