"""Module-name matching shared by the methods that wrap modules (IA3, bottleneck adapters).

The rules are LoRA's (:mod:`pyfastpeft.tuners.inject`): a list of names matches the end of a module path
at a ``.`` boundary, a string is a regex matched against the full path; ``layers_to_transform`` keeps
modules inside the listed layer indices.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from torch import nn

from .inject import _layer_index, _matches, _set_submodule
from .modules_to_save import ModulesToSaveWrapper

__all__ = ["check_layers", "in_layers", "matches", "near_names", "set_submodule", "walk_unwrapped"]

matches = _matches
set_submodule = _set_submodule


def walk_unwrapped(module: nn.Module, stop: tuple[type, ...], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into the wrapper types ``stop`` (nor modules_to_save
    wrappers), so the paths it gives are the user's module paths."""
    yield prefix, module
    if isinstance(module, (*stop, ModulesToSaveWrapper)):
        return
    for name, child in module.named_children():
        yield from walk_unwrapped(child, stop, f"{prefix}.{name}" if prefix else name)


def in_layers(path: str, layers: list[int] | None, layers_pattern: Any) -> bool:
    return layers is None or _layer_index(path, layers_pattern) in layers


def near_names(wanted: list[str] | str, paths: list[str], n: int = 6) -> list[str]:
    """Module paths (and their last components) close to ``wanted``, for error messages."""
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    pool = short + paths
    return sorted({c for w in wanted for c in difflib.get_close_matches(w, pool, n=n, cutoff=0.3)})


def check_layers(name: str, value: Any) -> None:
    """``layers_to_transform``: None or a list of non-negative ints."""
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{name}: expected a non-negative int or a list of them, got {value!r}")
