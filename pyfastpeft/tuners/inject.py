"""Find the modules a LoraConfig targets and wrap them in LoRA layers."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .lora_layers import QUANTIZED_BASES, LoraEmbedding, LoraLayer, LoraLinear, is_conv1d
from .modules_to_save import ModulesToSaveWrapper
from .peft_defaults import LORA_TARGET_MODULES, add_task_heads, default_targets, find_modules_to_save, is_saved_module

_LAYER_LISTS = ("layers", "h", "blocks", "layer")


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into LoRA layers or modules_to_save wrappers, so the paths it
    gives are the user's module paths."""
    yield prefix, module
    if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
        return
    for name, child in module.named_children():
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, LoraLayer, *QUANTIZED_BASES)) or is_conv1d(module)


def _matches(path: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith("." + p) for p in patterns)


def _layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    names = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or _LAYER_LISTS)
    for name in names:
        m = re.match(rf"(?:.*\.)?{re.escape(name)}\.(\d+)\.", path)
        if m:
            return int(m.group(1))
    return None


def _output_layer_names(model: nn.Module) -> set[str]:
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


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts; a ValueError when none match or a match cannot be adapted.
    ``target_modules=None`` takes PEFT's default for the model type (written into ``config``, as PEFT does).
    Modules that ``modules_to_save`` names are never targets (PEFT's rule)."""
    if config.target_modules is None:
        config.target_modules = default_targets(LORA_TARGET_MODULES, model, "target_modules", "LoRA")
    entries = list(walk(model))
    chosen = []
    if config.target_modules == "all-linear":
        out_names = _output_layer_names(model)
        candidates = [(p, m) for p, m in entries if p and (isinstance(m, (nn.Linear, LoraLinear)) or is_conv1d(m))]
        chosen = [p for p, _ in candidates if p.rsplit(".", 1)[-1] not in out_names and p not in out_names]
    else:
        for path, module in entries:
            if not path or not _matches(path, config.target_modules):
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
        chosen = [p for p in chosen if not _matches(p, config.exclude_modules)]
    chosen = [p for p in chosen if not is_saved_module(p, config.modules_to_save)]
    if config.layers_to_transform is not None:
        chosen = [p for p in chosen if _layer_index(p, config.layers_pattern) in config.layers_to_transform]
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


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapter(model: nn.Module, config: LoraConfig, name: str) -> list[str]:
    """Add adapter ``name`` to every module ``config`` targets (wrapping plain modules on first use) and
    its modules_to_save copies. Validates everything before changing the model. Returns the adapted paths."""
    saves = _find_modules_to_save(model, config)
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
            _set_submodule(model, path, module)
        r = pattern_value(path, config.rank_pattern, config.r)
        alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
        module.update_layer(
            name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, config.init_lora_weights
        )
    _tie(model, config, name, targets)
    wrap_modules_to_save(model, saves, name)
    return targets


def wrap_modules_to_save(model: nn.Module, paths: list[str], name: str) -> None:
    """Give adapter ``name`` its trainable copy of each module in ``paths`` (wrapping it first)."""
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            _set_submodule(model, path, module)
        module.add(name)


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


def _find_modules_to_save(model: nn.Module, config) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names, after adding the head of its ``task_type``
    (PEFT's rules: see :mod:`pyfastpeft.tuners.peft_defaults`). Unmatched names are an error in a config
    written in code and a warning in one read from an adapter file."""
    heads = add_task_heads(config)
    if not config.modules_to_save:
        return []
    paths = [p for p, _ in walk(model) if p]
    strict = not getattr(config, "_from_file", False)
    return find_modules_to_save(paths, list(config.modules_to_save), heads, strict)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in walk(model):
        if isinstance(module, LoraLayer):
            yield path, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for path, module in walk(model):
        if isinstance(module, ModulesToSaveWrapper):
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


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, t in seen.values() if t)
    return trainable, total
