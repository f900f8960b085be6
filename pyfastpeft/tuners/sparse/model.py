"""SparseModel: sparse fine-tuning as a PEFT method (peft_type "SPARSE", not in Hugging Face PEFT).

Every targeted ``nn.Linear`` becomes a :class:`~pyfastpeft.nn.SparseDeltaLinear` (the same weight and
bias, frozen; only ``delta`` at k sorted flat indices trains, and its backward computes Δ's gradient at
those k entries only). A model holds one sparse adapter: the layer holds one delta.

    disable_adapter()   Δ is swapped out for zeros inside the block
    merge_adapter()     W₀ += Δ (Δ swapped out for zeros); unmerge_adapter() subtracts it again
    merge_and_unload()  plain ``nn.Linear`` layers holding W₀ + Δ

File layout (``adapter_model.safetensors``), per adapted module path P:
    base_model.model.P.delta [k]   base_model.model.P.indices [k] (int64, sorted flat indices into W)
plus the modules_to_save copies; ``adapter_config.json`` holds the SparseConfig.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn.sparse_delta_linear import SparseDeltaLinear
from ..base import BaseTuner
from ..matching import in_layers, matches, near_names, set_submodule, walk_unwrapped
from ..peft_defaults import is_saved_module
from .config import SparseConfig

PREFIX = "base_model.model."


class SparseModel(BaseTuner):
    """``model`` with a sparse delta on the target linears. Build it with
    ``pyfastpeft.get_peft_model(model, SparseConfig(target_modules=[...], density=...))``."""

    layer_types = (SparseDeltaLinear,)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._disabled: dict[str, torch.Tensor] | None = None  # deltas swapped out by disable_adapter
        self._merged: dict[str, torch.Tensor] | None = None  # deltas folded into W₀ by merge_adapter

    def _layers(self) -> list[tuple[str, SparseDeltaLinear]]:
        return [(p, m) for p, m in walk_unwrapped(self.model, self.layer_types) if isinstance(m, SparseDeltaLinear)]

    def _find_targets(self, config: SparseConfig) -> list[str]:
        entries = [(p, m) for p, m in walk_unwrapped(self.model, self.layer_types) if p]
        chosen = [p for p, m in entries if type(m) is nn.Linear and matches(p, config.target_modules)]
        if config.exclude_modules is not None:
            chosen = [p for p in chosen if not matches(p, config.exclude_modules)]
        chosen = [p for p in chosen if not is_saved_module(p, config.modules_to_save)]
        chosen = [p for p in chosen if in_layers(p, config.layers_to_transform, config.layers_pattern)]
        if not chosen:
            linear = [p for p, m in entries if type(m) is nn.Linear]
            raise ValueError(
                f"target_modules {config.target_modules} matched no nn.Linear in {type(self.model).__name__}; "
                f"nearest names: {near_names(config.target_modules, linear) or 'none'}"
            )
        return chosen

    # ---- hooks ------------------------------------------------------------------------------------
    def _inject(self, name: str, config: SparseConfig) -> None:
        if self.peft_config:
            raise ValueError(
                f"adapter_name: this model already holds adapter {next(iter(self.peft_config))!r}; a sparse "
                f"delta layer holds one delta, so a model holds one sparse adapter (delete it first)"
            )
        targets = self._find_targets(config)
        generator = torch.Generator().manual_seed(config.seed)
        for path in targets:
            linear = self.model.get_submodule(path)
            layer = SparseDeltaLinear.from_linear(
                linear, density=config.density, strategy=config.selection, generator=generator
            )
            set_submodule(self.model, path, layer)

    def _remove(self, name: str) -> None:
        self._unmerge()
        self._to_linear()

    def _unload(self) -> nn.Module:
        self._to_linear()
        self.peft_config.clear()
        return self.model

    def _to_linear(self) -> None:
        """Every sparse layer replaced by a plain ``nn.Linear`` holding its weight and bias (W₀, or W₀ + Δ
        when merged first)."""
        for path, layer in self._layers():
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            set_submodule(self.model, path, linear)
        self._disabled = self._merged = None

    @torch.no_grad()
    def _activate(self, names: list[str]) -> None:
        if not names and self._disabled is None:
            self._disabled = self._swap_out()
        elif names and self._disabled is not None:
            self._swap_in(self._disabled)
            self._disabled = None

    def _swap_out(self) -> dict[str, torch.Tensor]:
        saved = {}
        for path, layer in self._layers():
            saved[path] = layer.delta.detach().clone()
            layer.delta.zero_()
        return saved

    def _swap_in(self, saved: dict[str, torch.Tensor]) -> None:
        for path, layer in self._layers():
            layer.delta.copy_(saved[path])

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.peft_config:
            return {}
        out: dict[str, torch.Tensor] = {}
        for path, layer in self._layers():
            out[f"{PREFIX}{path}.delta"] = layer.delta
            out[f"{PREFIX}{path}.indices"] = layer.indices
        return out

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.peft_config:
            return {}
        saved = self._merged or self._disabled
        out = {}
        for path, layer in self._layers():
            delta = saved[path] if saved is not None else layer.delta.detach()
            dense = torch.zeros(layer.weight.numel(), dtype=delta.dtype, device=delta.device)
            dense[layer.indices.long()] = delta
            out[f"{path}.weight"] = dense.view_as(layer.weight)
        return out

    @torch.no_grad()
    def _merge(self, names: list[str]) -> None:
        if not names or self._merged is not None:
            return
        if self._disabled is not None:
            self._activate(names)
        for _, layer in self._layers():
            layer.weight.view(-1).index_add_(0, layer.indices, layer.delta.to(layer.weight.dtype))
        self._merged = self._swap_out()

    @torch.no_grad()
    def _unmerge(self) -> None:
        if self._merged is None:
            return
        self._swap_in(self._merged)
        for _, layer in self._layers():
            layer.weight.view(-1).index_add_(0, layer.indices, -layer.delta.to(layer.weight.dtype))
        self._merged = None
