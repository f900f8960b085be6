"""(IA)³: learned per-feature scaling of keys, values and the feed-forward activation.

For a target linear ``y = W x + b`` with vector ``l``:
    attention-side (not feed-forward):  y = l ⊙ (W x + b)          l: [out, 1]
    feed-forward:                       y = W (l ⊙ x) + b           l: [1, in]
exactly as Hugging Face PEFT does (the output scaling also scales the bias). Merging folds ``l`` into
W's rows (output) or columns (input), and into b for the output case.

Cost over the base linear: the feed-forward case scales the matmul's input (an input-sized temporary,
nothing weight-sized); the output case is one elementwise multiply of the matmul's output. Both go
through the op :func:`pyfastpeft.ops.ia3_scale`, whose backward makes ``dx`` and ``dl`` in one pass over
the activations. Backward keeps what PEFT's keeps: the input x (feed-forward) or the pre-scaling output.

Files: ``base_model.model.<path>.ia3_l`` per adapted module, PEFT's exact keys and shapes, plus
modules_to_save as ``base_model.model.<path>.<param>``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .. import ops
from .base import TunerModel
from .config import _check_patterns
from .lora_layers import BaseLayerPassthrough, is_conv1d
from .matching import check_layers, in_layers, matches, near_names, set_submodule, walk_unwrapped
from .peft_defaults import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES, default_targets, is_saved_module
from .registry import register_peft_type

PREFIX = "base_model.model."

@dataclass
class IA3Config:
    """Configuration of one (IA)³ adapter (PEFT's ``IA3Config`` fields and defaults).

    Args:
        target_modules: modules to scale: a list of names matched against the end of each module path, or
            a regex matched against the full path. None: PEFT's default for the model type (its table, e.g.
            Llama: k_proj, v_proj, down_proj; Qwen2: q_proj, v_proj, down_proj; GPT-2: c_attn, mlp.c_proj).
        feedforward_modules: which targets scale their input instead of their output (a list of suffixes,
            matched with a plain ``endswith`` as PEFT does, or a regex); a subset of target_modules.
        exclude_modules: modules never to adapt (same kinds of patterns as target_modules).
        fan_in_fan_out: the base weight is stored [in, out] (transformers' Conv1D); set automatically.
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: True: every scale starts at 1 (the adapter is the identity); False: random
            (for tests).
        layers_to_transform / layers_pattern: only adapt modules inside these layer indices.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = "IA3"

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        if self.peft_type != "IA3":
            raise ValueError(f"peft_type: expected 'IA3', got {self.peft_type!r}")
        _check_patterns("target_modules", self.target_modules, allow_none=True)
        _check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.feedforward_modules != []:  # [] (no feed-forward module) is a valid choice
            _check_patterns("feedforward_modules", self.feedforward_modules, allow_none=True)
        if self.modules_to_save is not None:
            _check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules: {extra} are not in target_modules {self.target_modules}")
        check_layers("layers_to_transform", self.layers_to_transform)
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern: only meaningful together with layers_to_transform")
            _check_patterns("layers_pattern", self.layers_pattern, allow_none=False)
        for flag in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected a bool, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("layers_to_transform", "layers_pattern"):  # not PEFT fields: written only when set
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IA3Config:
        if d.get("peft_type", "IA3") != "IA3":
            raise ValueError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not IA3")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def is_feedforward(path: str, feedforward_modules: list[str] | str | None) -> bool:
    """PEFT's rule: a regex must match the full path; a list entry matches with a plain ``endswith``."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(f) for f in feedforward_modules)


class IA3Linear(BaseLayerPassthrough, nn.Module):
    """(IA)³ on ``nn.Linear`` (weight [out, in]) or Conv1D (weight [in, out]); several named vectors,
    one set active. ``ia3_l[name]`` is [1, in] for a feed-forward layer, [out, 1] otherwise."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        if is_conv1d(base_layer):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear):
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            raise ValueError(f"base_layer: expected nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.is_feedforward = feedforward
        self.ia3_l = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    def update_layer(self, name: str, init: bool) -> None:
        w = self.base_layer.weight
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(vector.to(device=w.device, dtype=w.dtype))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        del self.ia3_l[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _scale_oi(self, name: str, acc: torch.dtype) -> torch.Tensor:
        """The vector shaped to broadcast over the [out, in] weight."""
        return self.ia3_l[name].detach().to(acc)

    def _weight_oi(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of the [out, in] weight that merging ``name`` makes (float32; float64 for float64)."""
        w = self._weight_oi().detach()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        scale = self._scale_oi(name, acc)
        w = w.to(acc)
        if name in self.merged_adapters:  # the base holds W·l now
            w = w / scale
        return w * (scale - 1)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.merged_adapters or name not in self.ia3_l:
                continue
            w = self._weight_oi()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w.copy_((w.to(acc) * self._scale_oi(name, acc)).to(w.dtype))
            bias = self.bias
            if not self.is_feedforward and bias is not None:
                bias.copy_((bias.to(acc) * self.ia3_l[name].reshape(bias.shape).to(acc)).to(bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            if bool((self.ia3_l[name] == 0).any()):
                raise ValueError(
                    f"unmerge: adapter {name!r} has zero scales, so the merged weights cannot be divided back; "
                    "reload the base weights instead"
                )
            self.merged_adapters.pop()
            w = self._weight_oi()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w.copy_((w.to(acc) / self._scale_oi(name, acc)).to(w.dtype))
            bias = self.bias
            if not self.is_feedforward and bias is not None:
                bias.copy_((bias.to(acc) / self.ia3_l[name].reshape(bias.shape).to(acc)).to(bias.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[active[0]].flatten()
        for name in active[1:]:
            scale = scale * self.ia3_l[name].flatten()
        # pyfastpeft.ops.ia3_scale: x ⊙ l whose backward makes dx and dl in one pass
        if self.is_feedforward:
            return self.base_layer(ops.ia3_scale(x, scale.to(x.dtype)), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return ops.ia3_scale(y, scale.to(y.dtype))

    def extra_repr(self) -> str:
        kind = "input" if self.is_feedforward else "output"
        return f"scales={kind}, adapters={list(self.ia3_l)}"


class IA3Model(TunerModel):
    """``model`` with (IA)³ vectors on the target linears. Build it with
    ``pyfastpeft.get_peft_model(model, IA3Config(...))``."""

    def _layers(self):
        for path, module in walk_unwrapped(self.base_model.model, (IA3Linear,)):
            if isinstance(module, IA3Linear):
                yield path, module

    def _resolve_defaults(self, config: IA3Config) -> None:
        """PEFT's defaults for the model type where a field is None (the built-in model counts as Llama)."""
        model = self.base_model.model
        if config.target_modules is None:
            config.target_modules = default_targets(IA3_TARGET_MODULES, model, "target_modules", "(IA)³")
        if config.feedforward_modules is None:
            feedforward = default_targets(IA3_FEEDFORWARD_MODULES, model, "feedforward_modules", "(IA)³")
            given = config.target_modules
            # with targets of the user's, keep the defaults among them, so the saved config stays valid
            config.feedforward_modules = [f for f in feedforward if not isinstance(given, list) or f in given]

    def _find_targets(self, config: IA3Config) -> list[str]:
        entries = [(p, m) for p, m in walk_unwrapped(self.base_model.model, (IA3Linear,)) if p]
        chosen = []
        for path, module in entries:
            if not matches(path, config.target_modules):
                continue
            if isinstance(module, IA3Linear) or isinstance(module, nn.Linear) or is_conv1d(module):
                chosen.append(path)
            elif isinstance(config.target_modules, str):
                raise ValueError(
                    f"target_modules: {path} ({type(module).__name__}) matched, but (IA)³ takes only nn.Linear "
                    "and transformers' Conv1D"
                )
        if config.exclude_modules is not None:
            chosen = [p for p in chosen if not matches(p, config.exclude_modules)]
        chosen = [p for p in chosen if not is_saved_module(p, config.modules_to_save)]
        chosen = [p for p in chosen if in_layers(p, config.layers_to_transform, config.layers_pattern)]
        if not chosen:
            linear = [p for p, m in entries if isinstance(m, (nn.Linear, IA3Linear)) or is_conv1d(m)]
            raise ValueError(
                f"target_modules {config.target_modules} matched no nn.Linear or Conv1D in "
                f"{type(self.base_model.model).__name__}; nearest names: "
                f"{near_names(config.target_modules, linear) or 'none'}"
            )
        return chosen

    def _inject(self, name: str, config: IA3Config) -> None:
        # modules_to_save: the TunerModel frame wraps them
        self._resolve_defaults(config)
        config.validate()
        model = self.base_model.model
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
        model = self.base_model.model
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
        for _, layer in self._layers():
            layer.merge(names)

    def _unmerge(self) -> None:
        for _, layer in self._layers():
            layer.unmerge()

    def _unload(self) -> nn.Module:
        """Every (IA)³ layer replaced by its base layer (scaled when merged first: merge_and_unload)."""
        model = self.base_model.model
        for path, layer in list(self._layers()):
            set_submodule(model, path, layer.base_layer)
        return model

    def config_json(self, adapter_name: str) -> dict:
        d = super().config_json(adapter_name)
        base_config = getattr(self.base_model.model, "config", None)
        source = getattr(base_config, "_name_or_path", None)
        if d.get("base_model_name_or_path") is None and source:
            d["base_model_name_or_path"] = source
        return d


register_peft_type("IA3", IA3Config, IA3Model)
