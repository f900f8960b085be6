"""LayerFreezeModel: trains the selected tensors of the base model in place."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from torch import nn

from ..in_place import InPlaceTuner
from .config import PREFIX, LayerFreezeConfig, is_index

__all__ = ["LayerFreezeModel", "block_list", "select_parameters"]


def block_list(model: nn.Module, layers_pattern: str | None) -> tuple[str, int]:
    """(path, length) of the model's stack of blocks."""
    if layers_pattern is not None:
        try:
            blocks = model.get_submodule(layers_pattern)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList):
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise ValueError(f"layers_pattern: {layers_pattern!r} is not an nn.ModuleList of the model; lists: {lists}")
        return layers_pattern, len(blocks)
    lists = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return "", 0
    return max(lists, key=lambda nm: nm[1])


def select_parameters(names: list[str], spec: dict[str, Any], blocks: tuple[str, int], where: str = "") -> list[str]:
    """The parameter names (out of ``names``) one selection trains; a ValueError naming the field when a
    selector is out of range or matches nothing."""
    path, n = blocks
    indices: set[int] = set()
    block_keys = [k for k in ("layers_to_transform", "layer_range", "first_layers", "last_layers") if k in spec]
    if block_keys and n == 0:
        raise ValueError(f"{where}{block_keys[0]}: the model has no nn.ModuleList of blocks (set layers_pattern)")
    if "layers_to_transform" in spec:
        bad = [i for i in spec["layers_to_transform"] if i >= n]
        if bad:
            raise ValueError(f"{where}layers_to_transform: {bad} out of range; {path} has {n} blocks (0..{n - 1})")
        indices |= set(spec["layers_to_transform"])
    if "layer_range" in spec:
        start, stop = spec["layer_range"]
        stop = n if stop is None else stop
        if start >= n or stop > n:
            raise ValueError(f"{where}layer_range: {spec['layer_range']} out of range; {path} has {n} blocks")
        indices |= set(range(start, stop))
    for key, pick in (("first_layers", lambda k: range(k)), ("last_layers", lambda k: range(n - k, n))):
        if key in spec:
            if spec[key] > n:
                raise ValueError(f"{where}{key}: expected 1..{n} (blocks in {path}), got {spec[key]}")
            indices |= set(pick(spec[key]))
    in_blocks = [p for p in names if any(p.startswith(f"{path}.{i}.") for i in indices)]
    patterns = []
    if "trainable_regex" in spec:
        regex = re.compile(spec["trainable_regex"])
        hits = [p for p in names if regex.fullmatch(p)]
        if not hits:
            raise ValueError(f"{where}trainable_regex: {spec['trainable_regex']!r} matches no parameter name")
        patterns += hits
    for glob in spec.get("trainable_parameters", []):
        hits = fnmatch.filter(names, glob)
        if not hits:
            raise ValueError(f"{where}trainable_parameters: {glob!r} matches no parameter name")
        patterns += hits
    if block_keys and patterns:
        chosen = [p for p in in_blocks if p in set(patterns)]
        if not chosen:
            raise ValueError(f"{where}trainable_regex / trainable_parameters: no match inside the chosen blocks")
        return chosen
    return in_blocks if block_keys else sorted(set(patterns), key=names.index)


class LayerFreezeModel(InPlaceTuner):
    """``model`` with the chosen tensors trainable in full, in place, and everything else frozen."""

    def _inject(self, name: str, config: LayerFreezeConfig) -> None:
        self._init_in_place()
        self._check_single(name)
        model = self.model
        saved = self.saved_module_paths(config)
        names = [p for p, _ in model.named_parameters() if not any(p == s or p.startswith(s + ".") for s in saved)]
        blocks = block_list(model, config.layers_pattern)
        base = select_parameters(names, config.selection(), blocks) if config.selection() else []
        stages = {}
        for step, spec in sorted((config.unfreeze_schedule or {}).items()):
            stages[step] = select_parameters(names, spec, blocks, f"unfreeze_schedule[{step}].")
        everything = list(dict.fromkeys(base + [p for chosen in stages.values() for p in chosen]))
        if not everything:
            raise ValueError("LayerFreezeConfig: the selection matches no parameter")
        params = dict(model.named_parameters())
        self._snapshot({PREFIX + p: params[p] for p in everything})
        self._base_keys = [PREFIX + p for p in base]
        self._stages = {step: [PREFIX + p for p in chosen] for step, chosen in stages.items()}
        self._unfrozen = set(self._base_keys)

    def _remove(self, name: str) -> None:
        self._restore_initial()
        self._live, self._unfrozen = {}, set()

    def _unload(self) -> nn.Module:
        """The model with its trained tensors (they are the model's own)."""
        self._live, self._unfrozen = {}, set()
        self.peft_config.clear()
        return self.model

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """What trains now (the schedule may add more later; see :meth:`schedule_parameters`)."""
        if name not in self.peft_config:
            return []
        return [t for k, t in self._live.items() if k in self._unfrozen]

    def schedule_parameters(self) -> list[nn.Parameter]:
        """Every tensor the adapter trains at some step: give these to the optimizer up front (a tensor
        still frozen has no gradient, and torch's optimizers skip it)."""
        return list(self._live.values())

    def step_schedule(self, step: int) -> list[str]:
        """Train the base selection plus every schedule entry with a step <= ``step``; returns the names
        (in the user's model) this call unfroze. Call it at the start of each training step."""
        if not is_index(step) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        wanted = set(self._base_keys)
        for at, keys in self._stages.items():
            if at <= step:
                wanted |= set(keys)
        new = [k for k in self._live if k in wanted and k not in self._unfrozen]
        self._unfrozen = wanted
        active = self.active_adapter
        if active is not None and not getattr(self.peft_config[active], "inference_mode", False):
            for k, t in self._live.items():
                t.requires_grad_(k in self._unfrozen)
        return [k[len(PREFIX) :] for k in new]

    def trained_parameter_names(self) -> list[str]:
        """Names (in the user's model) of the tensors that train now."""
        return [k[len(PREFIX) :] for k in self._live if k in self._unfrozen]
