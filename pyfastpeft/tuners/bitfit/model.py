"""BitFit as a PEFT method: ``BitFitConfig`` (peft_type "BITFIT") and ``BitFitModel``.

Only biases train. Every targeted ``nn.Linear`` becomes a :class:`~pyfastpeft.nn.BiasOnlyLinear` (the
same weight, frozen; the backward of its bias-gradient op saves no input activation); a linear without a
bias gets a zero-initialised one, so the model's function is unchanged at the start. ``nn.LayerNorm``
(and GroupNorm) biases train too when ``train_layer_norm_bias``; RMSNorm has no bias, so Llama-shaped
models train only the linear biases.

File layout (``adapter_model.safetensors``): one tensor per trained bias, key
``base_model.model.<module path>.bias``, shape ``[out_features]`` (``[normalized_shape]`` for a norm);
plus the modules_to_save copies under ``base_model.model.<path>.<param>``. ``adapter_config.json``
holds the config with ``peft_type: "BITFIT"``.
"""

from __future__ import annotations

from torch import nn

from ...nn.bias_only_linear import BiasOnlyLinear
from ..in_place import InPlaceTuner
from ..matching import matches, output_layer_names, set_submodule, walk_unwrapped
from .config import BitFitConfig

_NORMS = (nn.LayerNorm, nn.GroupNorm)


class BitFitModel(InPlaceTuner):
    """``model`` with BitFit applied in place: targeted linears are BiasOnlyLinear, only biases train."""

    layer_types = (BiasOnlyLinear,)

    def _targets(self, config: BitFitConfig) -> tuple[list[str], list[str]]:
        """(linear paths, norm paths) the config trains; a ValueError when no linear matches."""
        model = self.model
        saved = self.saved_module_paths(config)
        inside_saved = lambda p: any(p == s or p.startswith(s + ".") for s in saved)  # noqa: E731
        entries = [(p, m) for p, m in walk_unwrapped(model, (BiasOnlyLinear,)) if p and not inside_saved(p)]
        linear = lambda m: isinstance(m, (nn.Linear, BiasOnlyLinear))  # noqa: E731
        if config.target_modules == "all-linear":
            out_names = output_layer_names(model)
            chosen = [
                p for p, m in entries if linear(m) and p not in out_names and p.rsplit(".", 1)[-1] not in out_names
            ]
        else:
            matched = [(p, m) for p, m in entries if matches(p, config.target_modules)]
            wrong = [f"{p} ({type(m).__name__})" for p, m in matched if not linear(m)]
            if wrong and isinstance(config.target_modules, str):
                raise ValueError(f"target_modules: {wrong[0]} matched, but BitFit adapts nn.Linear layers only")
            chosen = [p for p, m in matched if linear(m)]
        if config.exclude_modules is not None:
            chosen = [p for p in chosen if not matches(p, config.exclude_modules)]
        if not chosen:
            names = sorted({p.rsplit(".", 1)[-1] for p, m in entries if linear(m)})
            raise ValueError(
                f"target_modules {config.target_modules!r} matched no nn.Linear in {type(model).__name__}; "
                f"linear module names end in: {names}"
            )
        norms = []
        if config.train_layer_norm_bias:
            norms = [p for p, m in entries if isinstance(m, _NORMS) and isinstance(m.bias, nn.Parameter)]
        return chosen, norms

    def _inject(self, name: str, config: BitFitConfig) -> None:
        self._init_in_place()
        self._check_single(name)
        linears, norms = self._targets(config)
        model = self.model
        self._had_bias = {}
        tensors = {}
        for path in linears:
            module = model.get_submodule(path)
            if isinstance(module, nn.Linear):
                self._had_bias[path] = module.bias is not None
                module = BiasOnlyLinear.from_linear(module)
                set_submodule(model, path, module)
            tensors[f"base_model.model.{path}.bias"] = module.bias
        for path in norms:
            tensors[f"base_model.model.{path}.bias"] = model.get_submodule(path).bias
        self._snapshot(tensors)

    def _remove(self, name: str) -> None:
        """Back to the model as it was: initial bias values, plain nn.Linear, no added bias."""
        self._restore_initial()
        self._to_linear(keep_added_bias=False)
        self._live = {}

    def _unload(self) -> nn.Module:
        """The plain model with the trained biases: BiasOnlyLinear → nn.Linear holding the same weight and
        the trained bias (also where the bias was added)."""
        self._to_linear(keep_added_bias=True)
        self._live = {}
        self.peft_config.clear()
        return self.model

    def _to_linear(self, keep_added_bias: bool) -> None:
        model = self.model
        for path, had_bias in self._had_bias.items():
            module = model.get_submodule(path)
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = module.weight
            linear.bias = module.bias if (had_bias or keep_added_bias) else None
            set_submodule(model, path, linear)
        self._had_bias = {}

    def delta_weights(self, name: str) -> dict:
        # The report counts trained biases as "trained in place"; listing them as ΔW too would count them
        # twice. (The snapshot still serves disable_adapter and delete_adapter.)
        return {}

    def named_trained_biases(self) -> list[str]:
        """Paths (in the user's model) of the biases this adapter trains."""
        return [k[len("base_model.model.") :] for k in self._live]
