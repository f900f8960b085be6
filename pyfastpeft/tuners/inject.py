"""Replace matching nn.Linear modules with LoRALinear, freezing everything else."""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..nn import LoRALinear


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(
    model: nn.Module,
    target_modules: list[str] | str,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name matches ``target_modules`` (a list of
    name suffixes, or one regex matched against the full name) in a :class:`LoRALinear`.

    Returns the names of the adapted modules; a pattern that matches nothing raises a ValueError that
    lists the nearest module names.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linear_names if _matches(n, target_modules)]
    if not chosen:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        near = sorted({c for w in wanted for c in difflib.get_close_matches(w, linear_names, n=5, cutoff=0.3)})
        short = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"target_modules {wanted} matched no nn.Linear in {type(model).__name__}; "
            f"nearest names: {near or 'none'}; linear module names end in: {short}"
        )
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout, rslora=rslora))
    return chosen


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, t in seen.values() if t)
    return trainable, total
