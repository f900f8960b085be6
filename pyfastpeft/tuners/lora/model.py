"""LoraModel: the LoRA tuner (DoRA is its ``use_dora`` option, as in PEFT): finds the modules a
LoraConfig targets, wraps them in LoRA layers, merges, and maps the adapter to PEFT's file layout.

``adapter_model.safetensors`` holds, per adapted module path P (``base_model.model.`` + the path in the
user's model):
    P.lora_A.weight [r, in]   P.lora_B.weight [out, r]   P.lora_magnitude_vector [out] (DoRA)
    P.lora_embedding_A [r, num_embeddings]   P.lora_embedding_B [dim, r]   (nn.Embedding)
    P.base_layer.bias (bias='lora_only'), every bias (bias='all'), and modules_to_save as P.<param>;
    with tie_lora_A / tie_lora_B (not in PEFT): each shared factor once, as
    base_model.model.tied_lora_A.<module name>.weight / tied_lora_B.<module name>.weight;
``adapter_config.json`` the LoraConfig with ``peft_type: "LORA"``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ..base import BaseTuner
from ..layers import is_conv1d
from ..matching import (
    layer_index,
    matches,
    output_layer_names,
    pattern_value,
    save_wrappers,
    set_submodule,
    walk_unwrapped,
)
from ..peft_defaults import LORA_TARGET_MODULES, default_targets, is_saved_module
from .config import LoraConfig
from .embedding import LoraEmbedding
from .layer import BLOCK_BASES, QUANTIZED_BASES, LoraLayer, LoraLinear

PREFIX = "base_model.model."


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, LoraLayer, *QUANTIZED_BASES, *BLOCK_BASES)) or is_conv1d(module)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts; a ValueError when none match or a match cannot be adapted.
    ``target_modules=None`` takes PEFT's default for the model type (written into ``config``, as PEFT does).
    Modules that ``modules_to_save`` names are never targets (PEFT's rule)."""
    if config.target_modules is None:
        config.target_modules = default_targets(LORA_TARGET_MODULES, model, "target_modules", "LoRA")
    entries = list(walk_unwrapped(model, (LoraLayer,)))
    chosen = []
    if config.target_modules == "all-linear":
        out_names = output_layer_names(model)
        candidates = [
            (p, m) for p, m in entries if p and (isinstance(m, (nn.Linear, LoraLinear, *BLOCK_BASES)) or is_conv1d(m))
        ]
        chosen = [p for p, _ in candidates if p.rsplit(".", 1)[-1] not in out_names and p not in out_names]
    else:
        for path, module in entries:
            if not path or not matches(path, config.target_modules):
                continue
            if isinstance(config.target_modules, list) and not _adaptable(module):
                # A list name also matching a container (e.g. "attn" in GPT-2) is only an error if nothing
                # adaptable matched; record it for the message.
                continue
            if not _adaptable(module):
                raise ValueError(
                    f"target_modules: {path} ({type(module).__name__}) matched, but only nn.Linear, "
                    f"transformers' Conv1D and nn.Embedding can take LoRA"
                )
            chosen.append(path)
    if config.exclude_modules is not None:
        chosen = [p for p in chosen if not matches(p, config.exclude_modules)]
    chosen = [p for p in chosen if not is_saved_module(p, config.modules_to_save)]
    if config.layers_to_transform is not None:
        chosen = [p for p in chosen if layer_index(p, config.layers_pattern) in config.layers_to_transform]
    if not chosen:
        raise ValueError(_no_match_message(model, config, entries))
    return chosen


def _no_match_message(model: nn.Module, config: LoraConfig, entries) -> str:
    adaptable = [p for p, m in entries if p and _adaptable(m)]
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    short = sorted({p.rsplit(".", 1)[-1] for p in adaptable})
    near = sorted({c for w in wanted for c in difflib.get_close_matches(w, short + adaptable, n=5, cutoff=0.3)})
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" within layers_to_transform={config.layers_to_transform}"
    return (
        f"target_modules {wanted} matched no nn.Linear, Conv1D or nn.Embedding in "
        f"{type(model).__name__}{extra}; "
        f"nearest names: {near or 'none'}; adaptable module names end in: {short}"
    )


def inject_adapter(model: nn.Module, config: LoraConfig, name: str) -> list[str]:
    """Add adapter ``name`` to every module ``config`` targets (wrapping plain modules on first use).
    Validates everything before changing the model. Returns the adapted paths."""
    targets = find_targets(model, config)
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, nn.Embedding) and (config.use_dora or config.init_lora_weights == "pissa"):
            raise ValueError(
                f"target_modules: {path} is an nn.Embedding, which takes neither use_dora nor 'pissa' "
                f"initialisation; exclude it (exclude_modules=[{path.rsplit('.', 1)[-1]!r}])"
            )
        if is_conv1d(base):
            config.fan_in_fan_out = True
    _check_tied_shapes(model, config, targets)
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            module = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
            set_submodule(model, path, module)
        r = pattern_value(path, config.rank_pattern, config.r)
        alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
        module.update_layer(
            name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, config.init_lora_weights
        )
    _tie(model, config, name, targets)
    return targets


def tie_groups(targets: list[str]) -> dict[str, list[str]]:
    """Tied LoRA factors are shared by the modules of one name: {last path component: paths}."""
    groups: dict[str, list[str]] = {}
    for path in targets:
        groups.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return groups


def _check_tied_shapes(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    if not (config.tie_lora_A or config.tie_lora_B):
        return
    for group, paths in tie_groups(targets).items():
        shapes = {}
        for path in paths:
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            if isinstance(base, nn.Embedding):
                raise ValueError(
                    f"tie_lora_A/tie_lora_B: {path} is an nn.Embedding; tied factors take linear layers only"
                )
            if is_conv1d(base):
                d_in, d_out = base.weight.shape
            else:
                d_in, d_out = base.in_features, base.out_features
            r = pattern_value(path, config.rank_pattern, config.r)
            shapes[path] = ((r, d_in) if config.tie_lora_A else None, (d_out, r) if config.tie_lora_B else None)
        if len(set(shapes.values())) > 1:
            per = ", ".join(f"{p}: A {a} B {b}" for p, (a, b) in shapes.items())
            raise ValueError(f"tie_lora_A/tie_lora_B: the {group!r} layers cannot share factors, shapes differ ({per})")


def _tie(model: nn.Module, config: LoraConfig, name: str, targets: list[str]) -> None:
    """Point every layer of a group at the first layer's factor module: one Parameter, used (and
    receiving gradient) in every layer."""
    for paths in tie_groups(targets).values() if (config.tie_lora_A or config.tie_lora_B) else ():
        first = model.get_submodule(paths[0])
        for path in paths[1:]:
            layer = model.get_submodule(path)
            if config.tie_lora_A:
                layer.lora_A[name] = first.lora_A[name]
            if config.tie_lora_B:
                layer.lora_B[name] = first.lora_B[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in walk_unwrapped(model, (LoraLayer,)):
        if isinstance(module, LoraLayer):
            yield path, module


def inject_lora(
    model: nn.Module,
    target_modules: list[str] | str,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Freeze ``model`` and add one LoRA adapter named "default" to the matching modules, in place
    (:func:`pyfastpeft.get_peft_model` is the full API; this keeps the model object unwrapped)."""
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, use_rslora=rslora)
    targets = inject_adapter(model, config, "default")
    for _, layer in lora_layers(model):
        layer.set_adapter(["default"])
    return targets


class LoraModel(BaseTuner):
    """``model`` with LoRA adapters injected in place (the modules a LoraConfig targets are wrapped).
    Build it with ``pyfastpeft.get_peft_model(model, LoraConfig(...))``."""

    layer_types = (LoraLayer,)

    def _layers(self) -> list[tuple[str, LoraLayer]]:
        return list(lora_layers(self.model))

    # ---- hooks ------------------------------------------------------------------------------------
    def _inject(self, name: str, config: LoraConfig) -> None:
        inject_adapter(self.model, config, name)

    def _remove(self, name: str) -> None:
        layers = self._layers()
        for _, layer in layers:
            if name in layer.merged_adapters:
                raise ValueError(f"adapter {name!r} is merged; call unmerge_adapter() before deleting it")
        for _, layer in layers:
            layer.delete_adapter(name)

    def _activate(self, names: list[str]) -> None:
        for _, layer in self._layers():
            layer.set_adapter(names)

    def _disable(self) -> None:
        for _, layer in self._layers():
            if layer.merged_adapters:
                layer.unmerge()
            layer.disable_adapters = True

    def _enable(self) -> None:
        for _, layer in self._layers():
            layer.disable_adapters = False

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
        """Every LoRA layer replaced by its (merged, with merge_and_unload) base layer."""
        for path, layer in self._layers():
            set_submodule(self.model, path, layer.base_layer)
        return self.model

    def named_bias_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Biases that ``bias='all'`` trains (those of the model, not of adapter copies)."""
        for name, p in self.named_parameters(prefix="base_model"):
            if name.endswith(".bias") and ".modules_to_save." not in name and ".original_module." not in name:
                yield name, p

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's live tensors under Hugging Face PEFT's file keys."""
        config = self.peft_config[name]
        out: dict[str, torch.Tensor] = {}
        for path, layer in self._layers():
            if name not in layer.r:
                continue
            key = PREFIX + path
            if isinstance(layer, LoraLinear):
                # a tied factor is one tensor for every layer of that module name: written once
                group = path.rsplit(".", 1)[-1]
                a_key = f"{PREFIX}tied_lora_A.{group}.weight" if config.tie_lora_A else f"{key}.lora_A.weight"
                b_key = f"{PREFIX}tied_lora_B.{group}.weight" if config.tie_lora_B else f"{key}.lora_B.weight"
                out[a_key] = layer.lora_A[name].weight
                out[b_key] = layer.lora_B[name].weight
                if layer.use_dora[name]:
                    out[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight
            elif isinstance(layer, LoraEmbedding):
                out[f"{key}.lora_embedding_A"] = layer.lora_embedding_A[name]
                out[f"{key}.lora_embedding_B"] = layer.lora_embedding_B[name]
            bias = getattr(layer.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                out[f"{key}.base_layer.bias"] = bias
        if config.bias == "all":
            for key, p in self.named_bias_parameters():
                out[key] = p
        return out

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {PREFIX + path: layer.delta_weight(name) for path, layer in self._layers() if name in layer.r}

    def adapter_matrices(self, name: str) -> list[tuple[str, torch.Tensor, int, Any]]:
        """Per LoRA layer: ΔW, its rank r, and (B, A, scaling) when ΔW = scaling·B·A (plain LoRA), which
        gives ΔW's rank from an r×r core; DoRA's ΔW also rescales W's rows, so it has no factors."""
        rows = []
        for path, layer in self._layers():
            if name not in layer.r:
                continue
            if isinstance(layer, LoraLinear) and not layer.use_dora[name]:
                factors = (layer.lora_B[name].weight, layer.lora_A[name].weight, layer.scaling[name])
            elif isinstance(layer, LoraEmbedding):
                factors = (layer.lora_embedding_B[name], layer.lora_embedding_A[name], layer.scaling[name])
            else:
                factors = None
            rows.append((PREFIX + path, layer.delta_weight(name), layer.r[name], factors))
        return rows

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def config_for_loading(cls, config: LoraConfig, tensors: dict[str, torch.Tensor], source: Any) -> LoraConfig:
        # The saved tensors replace whatever the initialisation makes; PiSSA's would also rewrite the base
        # weights, so loading always injects with the plain initialisation.
        _check_tied_layout(config, tensors, source)
        d = config.to_dict()
        d["init_lora_weights"] = True
        inject = LoraConfig.from_dict(d)
        inject._from_file = getattr(config, "_from_file", False)
        return inject

    def _finish_load(self, name: str, file_config: LoraConfig) -> None:
        self.peft_config[name].init_lora_weights = file_config.init_lora_weights

    def also_loadable(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors PEFT may write beyond the adapter's own: whole embedding matrices (when embeddings are
        targeted or resized) and, with bias='all', the biases inside modules_to_save wrappers under their
        in-memory names (``P.original_module.bias``, ``P.modules_to_save.bias``)."""
        get_out = getattr(self.model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        found = {}
        for path, module in self.named_modules(prefix="base_model"):
            if isinstance(module, nn.Embedding) or (out is not None and module is out):
                for pname, p in module.named_parameters(recurse=False):
                    found[f"{path}.{pname}"] = p
        if self.peft_config[name].bias == "all":
            for path, wrapper in save_wrappers(self.model):
                modules = {"original_module": wrapper.original_module}
                if name in wrapper.modules_to_save:
                    modules["modules_to_save"] = wrapper.modules_to_save[name]
                for label, module in modules.items():
                    for pname, p in module.named_parameters():
                        if pname == "bias" or pname.endswith(".bias"):
                            found[f"{PREFIX}{path}.{label}.{pname}"] = p
        return found

    # ---- mixed-adapter batches --------------------------------------------------------------------
    def mixed_batch_forward(self, adapter_names: list[str], wrappers: list[nn.Module], *args, **kwargs):
        """One adapter per sequence (``"__base__"`` for none) in one batch, forward and backward: every
        LoRA linear runs the multi-adapter op over the tokens of all adapters at once, so several
        adapters can be trained together in one mixed batch."""
        lora = [layer for _, layer in self._layers()]
        if any(layer.merged_adapters for layer in lora):
            raise ValueError("adapter_names: unmerge the adapters first (unmerge_adapter())")
        known = list(self.peft_config)
        index = {n: i for i, n in enumerate(known)}
        seq_indices = [index.get(n, -1) for n in adapter_names]
        # LoRA linears and embeddings mix per token; modules_to_save split the batch by adapter.
        layers = lora + list(wrappers)
        for layer in layers:
            layer.mixed_batch = (known, seq_indices)
        try:
            return self.model(*args, **kwargs)
        finally:
            for layer in layers:
                layer.mixed_batch = None


def _check_tied_layout(config: LoraConfig, tensors: dict[str, torch.Tensor], source: Any) -> None:
    for flag, factor in (("tie_lora_A", "lora_A"), ("tie_lora_B", "lora_B")):
        per_layer = [k for k in tensors if k.endswith(f".{factor}.weight")]
        if getattr(config, flag) and per_layer:
            raise UserError(
                f"{source}: the config ties {factor} across layers ({flag}=True), but the file holds one {factor} "
                f"per layer (PEFT's layout, e.g. {per_layer[0]}); a tied adapter stores each shared factor once "
                f"as base_model.model.tied_{factor}.<module name>.weight. Load it with {flag}=False instead"
            )
