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
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..nn.bottleneck_adapter import ACTIVATIONS, BottleneckAdapter
from .base import TunerModel
from .config import _check_patterns
from .lora_layers import is_conv1d
from .matching import check_layers, in_layers, matches, near_names, set_submodule, walk_unwrapped
from .modules_to_save import ModulesToSaveWrapper
from .registry import register_peft_type

PREFIX = "base_model.model."
CONFIGS = ("houlsby", "pfeiffer", "parallel")

# Per architecture, a full-path regex per slot: the attention / feed-forward output projection (serial)
# and the attention / feed-forward block (parallel).
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama": {
        "attn": r".*\.self_attn\.o_proj",
        "ffn": r".*\.mlp\.down_proj",
        "attn_block": r".*\.self_attn",
        "ffn_block": r".*\.mlp",
    },
    "gpt2": {
        "attn": r".*\.attn\.c_proj",
        "ffn": r".*\.mlp\.c_proj",
        "attn_block": r".*\.h\.\d+\.attn",
        "ffn_block": r".*\.h\.\d+\.mlp",
    },
    # BERT has no feed-forward block module: its parallel adapter reads BertOutput's input (the
    # intermediate activation) and adds to its output.
    "bert": {
        "attn": r".*\.attention\.output\.dense",
        "ffn": r".*\.layer\.\d+\.output\.dense",
        "attn_block": r".*\.layer\.\d+\.attention",
        "ffn_block": r".*\.layer\.\d+\.output",
    },
}
ARCHITECTURES["mistral"] = ARCHITECTURES["qwen2"] = ARCHITECTURES["llama"]
ARCHITECTURES["roberta"] = ARCHITECTURES["bert"]


@dataclass
class AdapterConfig:
    """Configuration of one bottleneck adapter.

    Args:
        config: "houlsby" (serial, after attention and after the feed-forward), "pfeiffer" (serial, after
            the feed-forward) or "parallel" (beside the feed-forward block, or the attention block).
        reduction_factor: bottleneck = max(1, output features // reduction_factor).
        non_linearity: relu, gelu, silu or tanh.
        residual: serial adapters add to their input (``y + s·f(y)``); False replaces it (``s·f(y)``,
            which is not the identity at init). Parallel adapters always add to the block's output.
        scaling: s, the factor on the adapter's output.
        init_adapter_weights: True: up-projection zero, so the model starts as the base model.
        parallel_location: "ffn" or "attn", the block a parallel adapter sits beside.
        attn_modules / ffn_modules: override where the slots are: a list of module-name suffixes or a
            regex over the full path (serial: the output projection; parallel: the block).
        share_across_layers: one adapter per slot kind, the same module in every layer.
        layers_to_transform / layers_pattern: only adapt these layer indices.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    config: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    residual: bool = True
    scaling: float = 1.0
    init_adapter_weights: bool = True
    parallel_location: Literal["ffn", "attn"] = "ffn"
    attn_modules: list[str] | str | None = None
    ffn_modules: list[str] | str | None = None
    share_across_layers: bool = False
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "BOTTLENECK"

    def __post_init__(self) -> None:
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        for name in ("attn_modules", "ffn_modules", "modules_to_save"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        if self.peft_type != "BOTTLENECK":
            raise ValueError(f"peft_type: expected 'BOTTLENECK', got {self.peft_type!r}")
        if self.config not in CONFIGS:
            raise ValueError(f"config: expected one of {CONFIGS}, got {self.config!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
            raise ValueError(f"reduction_factor: expected a positive int, got {rf!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity: expected one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        s = self.scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or s in (float("inf"), float("-inf")):
            raise ValueError(f"scaling: expected a finite number, got {s!r}")
        if self.parallel_location not in ("ffn", "attn"):
            raise ValueError(f"parallel_location: expected 'ffn' or 'attn', got {self.parallel_location!r}")
        _check_patterns("attn_modules", self.attn_modules, allow_none=True)
        _check_patterns("ffn_modules", self.ffn_modules, allow_none=True)
        if self.modules_to_save is not None:
            _check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        check_layers("layers_to_transform", self.layers_to_transform)
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern: only meaningful together with layers_to_transform")
            _check_patterns("layers_pattern", self.layers_pattern, allow_none=False)
        for flag in ("residual", "init_adapter_weights", "share_across_layers", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected a bool, got {getattr(self, flag)!r}")

    def slots(self) -> list[str]:
        """The slot kinds this config adapts: attn / ffn (serial) or parallel."""
        return {"houlsby": ["attn", "ffn"], "pfeiffer": ["ffn"], "parallel": ["parallel"]}[self.config]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        if d.get("peft_type", "BOTTLENECK") != "BOTTLENECK":
            raise ValueError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not BOTTLENECK")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known - {"peft_version", "auto_mapping", "revision"})
        if unknown:
            raise ValueError(f"adapter_config.json: unknown AdapterConfig fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


class AdapterWrapper(nn.Module):
    """``base_module`` plus named bottleneck adapters (serial after it, or parallel beside it); the adapter
    modules may be shared with other wrappers."""

    def __init__(self, base_module: nn.Module):
        super().__init__()
        self.base_module = base_module
        self.adapters = nn.ModuleDict()
        self.kind: dict[str, str] = {}  # adapter name -> "serial" | "parallel"
        self.scaling: dict[str, float] = {}
        self.residual: dict[str, bool] = {}
        self.active_adapters: list[str] = []

    # Code that reads the wrapped module's attributes (``self_attn.num_heads``, ``o_proj.weight``) keeps working.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_module" or "base_module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["base_module"], name)

    def add(self, name: str, adapter: BottleneckAdapter, kind: str, scaling: float, residual: bool) -> None:
        self.adapters[name] = adapter
        self.kind[name], self.scaling[name], self.residual[name] = kind, float(scaling), residual

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        for table in (self.kind, self.scaling, self.residual):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forward(self, *args, **kwargs):
        out = self.base_module(*args, **kwargs)
        if not self.active_adapters:
            return out
        h = out[0] if isinstance(out, tuple) else out
        for name in self.active_adapters:
            adapter, s = self.adapters[name], self.scaling[name]
            if self.kind[name] == "parallel":
                x = args[0] if args else kwargs["hidden_states"]
                h = h + s * adapter(x)
            elif self.residual[name]:
                h = h + s * adapter(h)
            else:
                h = s * adapter(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        return f"adapters={[f'{n}:{self.kind[n]}' for n in self.adapters]}"


def _features(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a projection, or of a block: its first and last linear."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    if not linears:
        raise ValueError(f"{type(module).__name__} holds no nn.Linear or Conv1D to size an adapter from")

    def dims(m: nn.Module) -> tuple[int, int]:
        return tuple(m.weight.shape) if is_conv1d(m) else (m.in_features, m.out_features)

    return dims(linears[0])[0], dims(linears[-1])[1]


class AdapterModel(TunerModel):
    """``model`` with bottleneck adapters in its blocks. Build it with
    ``pyfastpeft.get_peft_model(model, AdapterConfig(...))``."""

    def _wrappers(self):
        for path, module in walk_unwrapped(self.base_model.model, (AdapterWrapper,)):
            if isinstance(module, AdapterWrapper):
                yield path, module

    def _slot_paths(self, config: AdapterConfig) -> dict[str, list[str]]:
        """{slot kind: module paths}; a ValueError naming near module names when a slot has none."""
        model = self.base_model.model
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
        model_type = getattr(getattr(self.base_model.model, "config", None), "model_type", None)
        if model_type in ARCHITECTURES:
            return model_type
        for arch in ("llama", "gpt2", "bert"):  # the built-in model and configs without a model_type
            if any(re.fullmatch(ARCHITECTURES[arch]["ffn"], p) for p in paths):
                return arch
        return None

    def _inject(self, name: str, config: AdapterConfig) -> None:
        # modules_to_save: the TunerModel frame wraps them
        model = self.base_model.model
        slots = self._slot_paths(config)
        w = next(model.parameters())
        plan: list[tuple[str, str, int, int]] = []  # (slot, path, in, out), all checked before any change
        for slot, paths in slots.items():
            for path in paths:
                module = model.get_submodule(path)
                base = module.base_module if isinstance(module, AdapterWrapper) else module
                d_in, d_out = _features(base)
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
        model = self.base_model.model
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
        model = self.base_model.model
        for path, wrapper in list(self._wrappers()):
            set_submodule(model, path, wrapper.base_module)
        return model


register_peft_type("BOTTLENECK", AdapterConfig, AdapterModel)
