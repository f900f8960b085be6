"""Bottleneck adapters (Houlsby, Pfeiffer, parallel), optionally one adapter shared by every layer.

For a wrapped module M with input x and output y (the first element when M returns a tuple):
    serial    y' = y + s·f(y)    (residual=False: y' = s·f(y))      after M
    parallel  y' = y + s·f(x)                                         beside M
with ``f = up ∘ act ∘ down`` (:class:`pyfastpeft.nn.BottleneckAdapter`), ``s = scaling``. Slots:
    houlsby   serial after the attention output projection and after the feed-forward output projection
    pfeiffer  serial after the feed-forward output projection
    parallel  beside the whole feed-forward block (or the attention block: parallel_location="attn")
Modules are found by regex per architecture (Llama and the built-in TinyLlama, GPT-2, BERT) or by the
config's ``attn_modules`` / ``ffn_modules``. The adapter is a wrapping module, not a forward hook, so
torch.compile traces it.

Files (PEFT has no such method; pyfastpeft's layout), per adapted module path P:
    base_model.model.P.adapter_down.weight [bottleneck, in]   .adapter_down.bias [bottleneck]
    base_model.model.P.adapter_up.weight   [out, bottleneck]  .adapter_up.bias   [out]
with ``share_across_layers``, one set per slot kind K (attn, ffn, parallel) instead:
    base_model.model.shared_adapter.K.adapter_down.weight ...
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...nn.bottleneck_adapter import BottleneckAdapter
from ..base import BaseTuner
from ..matching import in_layers, matches, near_names, set_submodule, walk_unwrapped
from ..modules_to_save import ModulesToSaveWrapper
from .config import ARCHITECTURES, AdapterConfig
from .layer import AdapterWrapper, features

PREFIX = "base_model.model."


class AdapterModel(BaseTuner):
    """``model`` with bottleneck adapters in its blocks. Build it with
    ``pyfastpeft.get_peft_model(model, AdapterConfig(...))``."""

    layer_types = (AdapterWrapper,)

    def _wrappers(self):
        for path, module in walk_unwrapped(self.model, (AdapterWrapper,)):
            if isinstance(module, AdapterWrapper):
                yield path, module

    def _slot_paths(self, config: AdapterConfig) -> dict[str, list[str]]:
        """{slot kind: module paths}; a ValueError naming near module names when a slot has none."""
        model = self.model
        entries = [(p, m) for p, m in walk_unwrapped(model, (AdapterWrapper,)) if p]
        paths = [p for p, _ in entries]
        arch = self._architecture(paths)
        found: dict[str, list[str]] = {}
        for slot in config.slots():
            key = slot if slot != "parallel" else f"{config.parallel_location}_block"
            override = config.attn_modules if key.startswith("attn") else config.ffn_modules
            pattern = override if override is not None else (ARCHITECTURES[arch][key] if arch else None)
            label = "attn_modules" if key.startswith("attn") else "ffn_modules"
            if pattern is None:
                raise ValueError(
                    f"{label}: {type(model).__name__} is not an architecture with known adapter slots "
                    f"({sorted(ARCHITECTURES)}); name its {'attention' if label == 'attn_modules' else 'feed-forward'} "
                    f"{'block' if slot == 'parallel' else 'output projection'} modules in {label}"
                )
            chosen = [p for p, m in entries if matches(p, pattern) and not isinstance(m, ModulesToSaveWrapper)]
            chosen = [p for p in chosen if in_layers(p, config.layers_to_transform, config.layers_pattern)]
            if not chosen:
                wanted = pattern if isinstance(pattern, list) else [re.sub(r"[^A-Za-z_.]", "", pattern).strip(".")]
                raise ValueError(
                    f"{label}: {pattern!r} matched no module of {type(model).__name__} for the {slot} adapter "
                    f"(config={config.config!r}); nearest module names: {near_names(wanted, paths) or 'none'}"
                )
            found[slot] = chosen
        return found

    def _architecture(self, paths: list[str]) -> str | None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type in ARCHITECTURES:
            return model_type
        for arch in ("llama", "gpt2", "bert"):  # the built-in model and configs without a model_type
            if any(re.fullmatch(ARCHITECTURES[arch]["ffn"], p) for p in paths):
                return arch
        return None

    def _inject(self, name: str, config: AdapterConfig) -> None:
        # modules_to_save: the PeftModel frame wraps them
        model = self.model
        slots = self._slot_paths(config)
        w = next(model.parameters())
        plan: list[tuple[str, str, int, int]] = []  # (slot, path, in, out), all checked before any change
        for slot, paths in slots.items():
            for path in paths:
                module = model.get_submodule(path)
                base = module.base_module if isinstance(module, AdapterWrapper) else module
                d_in, d_out = features(base)
                if slot != "parallel":
                    d_in = d_out  # a serial adapter reads the module's output
                plan.append((slot, path, d_in, d_out))
            if config.share_across_layers:
                shapes = {(i, o) for s, _, i, o in plan if s == slot}
                if len(shapes) > 1:
                    per = ", ".join(f"{p}: {i}->{o}" for s, p, i, o in plan if s == slot)
                    raise ValueError(
                        f"share_across_layers: the {slot} adapter cannot be shared, the layers' features differ ({per})"
                    )

        def make(d_in: int, d_out: int) -> BottleneckAdapter:
            return BottleneckAdapter(
                d_in,
                max(1, d_out // config.reduction_factor),
                d_out,
                config.non_linearity,
                config.init_adapter_weights,
                dtype=w.dtype,
                device=w.device,
            )

        shared: dict[str, BottleneckAdapter] = {}
        for slot, path, d_in, d_out in plan:
            if config.share_across_layers:
                adapter = shared.setdefault(slot, make(d_in, d_out))
            else:
                adapter = make(d_in, d_out)
            module = model.get_submodule(path)
            if not isinstance(module, AdapterWrapper):
                module = AdapterWrapper(module)
                set_submodule(model, path, module)
            kind = "parallel" if slot == "parallel" else "serial"
            module.add(name, adapter, kind, config.scaling, config.residual)
        if "_shared" not in self.__dict__:
            self._shared: dict[str, dict[str, BottleneckAdapter]] = {}
        self._shared[name] = shared  # {slot: the one adapter every layer uses}; empty when not shared

    def _remove(self, name: str) -> None:
        model = self.model
        for path, wrapper in list(self._wrappers()):
            if name in wrapper.adapters:
                wrapper.delete_adapter(name)
            if not len(wrapper.adapters):
                set_submodule(model, path, wrapper.base_module)
        self._shared.pop(name, None)

    def _activate(self, names: list[str]) -> None:
        for _, wrapper in self._wrappers():
            wrapper.active_adapters = [n for n in names if n in wrapper.adapters]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self._shared.get(name):
            for slot, adapter in self._shared[name].items():
                for pname, p in adapter.named_parameters():
                    out[f"{PREFIX}shared_adapter.{slot}.{pname}"] = p
        else:
            for path, wrapper in self._wrappers():
                if name in wrapper.adapters:
                    for pname, p in wrapper.adapters[name].named_parameters():
                        out[f"{PREFIX}{path}.{pname}"] = p
        return out

    def _unload(self) -> nn.Module:
        model = self.model
        for path, wrapper in list(self._wrappers()):
            set_submodule(model, path, wrapper.base_module)
        return model
