"""IA3Model: the (IA)³ tuner: injects IA3Linear layers by name pattern, merges, holds named adapters."""

from __future__ import annotations

import torch
from torch import nn

from ...nn.gguf import GGUFLinear
from ..base import BaseTuner
from ..layers import is_conv1d
from ..matching import in_layers, matches, near_names, set_submodule, walk_unwrapped
from ..peft_defaults import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES, default_targets, is_saved_module
from .config import IA3Config
from .layer import IA3Linear, is_feedforward

PREFIX = "base_model.model."
# what (IA)³ wraps, besides transformers' Conv1D (recognised by name)
TARGET_TYPES = (nn.Linear, GGUFLinear)


class IA3Model(BaseTuner):
    """``model`` with (IA)³ vectors on the target linears. Build it with
    ``pyfastpeft.get_peft_model(model, IA3Config(...))``."""

    layer_types = (IA3Linear,)

    def _layers(self):
        for path, module in walk_unwrapped(self.model, (IA3Linear,)):
            if isinstance(module, IA3Linear):
                yield path, module

    def _resolve_defaults(self, config: IA3Config) -> None:
        """PEFT's defaults for the model type where a field is None (the built-in model counts as Llama)."""
        model = self.model
        if config.target_modules is None:
            config.target_modules = default_targets(IA3_TARGET_MODULES, model, "target_modules", "(IA)³")
        if config.feedforward_modules is None:
            feedforward = default_targets(IA3_FEEDFORWARD_MODULES, model, "feedforward_modules", "(IA)³")
            given = config.target_modules
            # with targets of the user's, keep the defaults among them, so the saved config stays valid
            config.feedforward_modules = [f for f in feedforward if not isinstance(given, list) or f in given]

    def _find_targets(self, config: IA3Config) -> list[str]:
        entries = [(p, m) for p, m in walk_unwrapped(self.model, (IA3Linear,)) if p]
        chosen = []
        for path, module in entries:
            if not matches(path, config.target_modules):
                continue
            if isinstance(module, (IA3Linear, *TARGET_TYPES)) or is_conv1d(module):
                chosen.append(path)
            elif isinstance(config.target_modules, str):
                raise ValueError(
                    f"target_modules: {path} ({type(module).__name__}) matched, but (IA)³ takes only nn.Linear, "
                    "transformers' Conv1D and GGUFLinear"
                )
        if config.exclude_modules is not None:
            chosen = [p for p in chosen if not matches(p, config.exclude_modules)]
        chosen = [p for p in chosen if not is_saved_module(p, config.modules_to_save)]
        chosen = [p for p in chosen if in_layers(p, config.layers_to_transform, config.layers_pattern)]
        if not chosen:
            linear = [p for p, m in entries if isinstance(m, (IA3Linear, *TARGET_TYPES)) or is_conv1d(m)]
            raise ValueError(
                f"target_modules {config.target_modules} matched no nn.Linear, Conv1D or GGUFLinear in "
                f"{type(self.model).__name__}; nearest names: "
                f"{near_names(config.target_modules, linear) or 'none'}"
            )
        return chosen

    def _inject(self, name: str, config: IA3Config) -> None:
        # modules_to_save: the PeftModel frame wraps them
        self._resolve_defaults(config)
        config.validate()
        model = self.model
        targets = self._find_targets(config)
        for path in targets:  # validate every target before changing the model
            module = model.get_submodule(path)
            feedforward = is_feedforward(path, config.feedforward_modules)
            if isinstance(module, IA3Linear) and module.is_feedforward != feedforward:
                raise ValueError(
                    f"feedforward_modules: {path} scales its {'input' if module.is_feedforward else 'output'} for "
                    f"adapters {list(module.ia3_l)}; a second adapter cannot scale the other side"
                )
            if is_conv1d(module.base_layer if isinstance(module, IA3Linear) else module):
                config.fan_in_fan_out = True
        for path in targets:
            module = model.get_submodule(path)
            if not isinstance(module, IA3Linear):
                module = IA3Linear(module, is_feedforward(path, config.feedforward_modules))
                set_submodule(model, path, module)
            module.update_layer(name, config.init_ia3_weights)

    def _remove(self, name: str) -> None:
        model = self.model
        for path, layer in list(self._layers()):
            if name in layer.ia3_l:
                layer.delete_adapter(name)
            if not len(layer.ia3_l):
                set_submodule(model, path, layer.base_layer)

    def _activate(self, names: list[str]) -> None:
        for _, layer in self._layers():
            layer.active_adapters = [n for n in names if n in layer.ia3_l]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, layer in self._layers():
            if name in layer.ia3_l:
                out[f"{PREFIX}{path}.ia3_l"] = layer.ia3_l[name]
        return out

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {path: layer.delta_weight(name) for path, layer in self._layers() if name in layer.ia3_l}

    def _merge(self, names: list[str]) -> None:
        layers = [layer for _, layer in self._layers()]
        for layer in layers:  # every layer checked before any weight changes
            layer.check_mergeable(names)
        for layer in layers:
            layer.merge(names)

    def _unmerge(self) -> None:
        for _, layer in self._layers():
            layer.unmerge()

    def _unload(self) -> nn.Module:
        """Every (IA)³ layer replaced by its base layer (scaled when merged first: merge_and_unload)."""
        model = self.model
        for path, layer in list(self._layers()):
            set_submodule(model, path, layer.base_layer)
        return model
