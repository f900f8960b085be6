"""Module-name matching and modules_to_save handling shared by every method.

A list of names matches the end of a module path at a ``.`` boundary, a string is a regex matched
against the full path; ``layers_to_transform`` keeps modules inside the listed layer indices.
modules_to_save follows PEFT's own rule (:mod:`pyfastpeft.tuners.peft_defaults`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from .modules_to_save import ModulesToSaveWrapper
from .peft_defaults import add_task_heads
from .peft_defaults import find_modules_to_save as _find_saved_paths

LAYER_LISTS = ("layers", "h", "blocks", "layer")


def walk_unwrapped(module: nn.Module, stop: tuple[type, ...] = (), prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into the wrapper types ``stop`` (nor modules_to_save
    wrappers), so the paths it gives are the user's module paths."""
    yield prefix, module
    if isinstance(module, (*stop, ModulesToSaveWrapper)):
        return
    for name, child in module.named_children():
        yield from walk_unwrapped(child, stop, f"{prefix}.{name}" if prefix else name)


def matches(path: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith("." + p) for p in patterns)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    names = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_LISTS)
    for name in names:
        m = re.match(rf"(?:.*\.)?{re.escape(name)}\.(\d+)\.", path)
        if m:
            return int(m.group(1))
    return None


def in_layers(path: str, layers: list[int] | None, layers_pattern: Any) -> bool:
    return layers is None or layer_index(path, layers_pattern) in layers


def output_layer_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        names |= {p for p, m in model.named_modules() if m is out}
    return names


def pattern_value(path: str, table: dict, default):
    """The value of the first ``{pattern: value}`` entry whose pattern matches the end of ``path``."""
    for key, value in table.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return value
    return default


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def near_names(wanted: list[str] | str, paths: list[str], n: int = 6) -> list[str]:
    """Module paths (and their last components) close to ``wanted``, for error messages."""
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    pool = short + paths
    return sorted({c for w in wanted for c in difflib.get_close_matches(w, pool, n=n, cutoff=0.3)})


# ---- config checks every method's config uses ------------------------------------------------------
def check_layers(name: str, value: Any) -> None:
    """``layers_to_transform``: None or a list of non-negative ints."""
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{name}: expected a non-negative int or a list of them, got {value!r}")


def check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}: {pattern!r} is not a valid regex ({err})") from None


def check_patterns(name: str, value: Any, allow_none: bool, allow_regex: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name}: expected a list of module names, got None")
        return
    if isinstance(value, str):
        if not allow_regex:
            raise ValueError(f"{name}: expected a list of module names, got the string {value!r}")
        if not value:
            raise ValueError(f"{name}: empty pattern")
        check_regex(name, value)
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"{name}: expected a non-empty list of non-empty module names or a regex string, got {value!r}"
        )


# ---- modules_to_save -------------------------------------------------------------------------------
def find_modules_to_save(model: nn.Module, config: Any, stop: tuple[type, ...] = ()) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names, after adding the head of its ``task_type``
    (PEFT's rules: see :mod:`pyfastpeft.tuners.peft_defaults`). Unmatched names are an error in a config
    written in code and a warning in one read from an adapter file."""
    heads = add_task_heads(config)
    if not config.modules_to_save:
        return []
    paths = [p for p, _ in walk_unwrapped(model, stop) if p]
    strict = not getattr(config, "_from_file", False)
    return _find_saved_paths(paths, list(config.modules_to_save), heads, strict)


def wrap_modules_to_save(model: nn.Module, paths: list[str], name: str) -> None:
    """Give adapter ``name`` its trainable copy of each module in ``paths`` (wrapping it first)."""
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            set_submodule(model, path, module)
        module.add(name)


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for path, module in walk_unwrapped(model):
        if isinstance(module, ModulesToSaveWrapper):
            yield path, module
