"""Layer freezing / selective layer tuning: ``LayerFreezeConfig`` (peft_type "LAYER_FREEZE") and
``LayerFreezeModel``.

Chosen tensors of the base model train in full, in place; everything else is frozen. The selection:

    blocks  = layers_to_transform ∪ range(*layer_range) ∪ first first_layers ∪ last last_layers
              (indices into the model's stack of blocks: the longest nn.ModuleList, or layers_pattern)
    matched = parameters whose name fully matches trainable_regex ∪ those matching a trainable_parameters
              glob (fnmatch, e.g. "*.mlp.down_proj.weight")
    trained = every parameter of `blocks` if no pattern is given, `matched` if no block is given,
              else the parameters of `blocks` that match

``unfreeze_schedule = {step: selection}`` (a dict with the fields above) widens the trained set:
``model.step_schedule(step)`` trains the base selection plus every entry whose step is ≤ ``step``.

File layout (``adapter_model.safetensors``): one full tensor per parameter the adapter can train (its
base selection and every schedule entry), key ``base_model.model.<parameter name>``, the shape of the
parameter; plus the modules_to_save copies. ``adapter_config.json`` holds the config with
``peft_type: "LAYER_FREEZE"``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from .config import _check_regex
from .in_place import InPlaceTunerModel
from .registry import register_peft_type

PREFIX = "base_model.model."
SELECTORS = (
    "layers_to_transform",
    "layer_range",
    "first_layers",
    "last_layers",
    "trainable_regex",
    "trainable_parameters",
)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_selection(d: dict[str, Any], where: str) -> None:
    """Field-by-field checks of one selection (the config's own or a schedule entry)."""
    lt = d.get("layers_to_transform")
    if lt is not None and not (isinstance(lt, list) and lt and all(_is_index(i) and i >= 0 for i in lt)):
        raise ValueError(f"{where}layers_to_transform: expected a non-empty list of block indices >= 0, got {lt!r}")
    lr = d.get("layer_range")
    if lr is not None:
        ok = isinstance(lr, (list, tuple)) and len(lr) == 2 and _is_index(lr[0]) and lr[0] >= 0
        ok = ok and (lr[1] is None or (_is_index(lr[1]) and lr[1] > lr[0]))
        if not ok:
            raise ValueError(
                f"{where}layer_range: expected [start, stop) with 0 <= start < stop (stop may be None), got {lr!r}"
            )
    for k in ("first_layers", "last_layers"):
        v = d.get(k)
        if v is not None and not (_is_index(v) and v >= 1):
            raise ValueError(f"{where}{k}: expected a positive number of blocks, got {v!r}")
    rx = d.get("trainable_regex")
    if rx is not None:
        if not isinstance(rx, str) or not rx:
            raise ValueError(f"{where}trainable_regex: expected a non-empty regex string, got {rx!r}")
        _check_regex(f"{where}trainable_regex", rx)
    tp = d.get("trainable_parameters")
    if tp is not None and not (isinstance(tp, list) and tp and all(isinstance(g, str) and g for g in tp)):
        raise ValueError(f"{where}trainable_parameters: expected a non-empty list of name globs, got {tp!r}")


@dataclass
class LayerFreezeConfig:
    """Configuration of selective layer tuning (see the module docstring for how fields combine).

    Args:
        layers_to_transform: block indices to train.
        layer_range: ``[start, stop)`` of blocks to train (``stop=None``: to the last block).
        first_layers / last_layers: train the first / last k blocks.
        trainable_regex: train parameters whose full name (in the user's model) matches this regex.
        trainable_parameters: train parameters whose name matches one of these globs.
        layers_pattern: path of the block list (e.g. ``"model.layers"``); default: the longest
            ``nn.ModuleList`` in the model.
        unfreeze_schedule: ``{step: selection}``; ``model.step_schedule(step)`` applies it.
        modules_to_save: modules trained as copies and saved with the adapter (e.g. a task head).
    """

    layers_to_transform: list[int] | None = None
    layer_range: list[int | None] | None = None
    first_layers: int | None = None
    last_layers: int | None = None
    trainable_regex: str | None = None
    trainable_parameters: list[str] | None = None
    layers_pattern: str | None = None
    unfreeze_schedule: dict[int, dict[str, Any]] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "LAYER_FREEZE"

    def __post_init__(self) -> None:
        if isinstance(self.layer_range, tuple):
            self.layer_range = list(self.layer_range)
        if isinstance(self.unfreeze_schedule, dict):  # JSON keys are strings
            try:
                self.unfreeze_schedule = {int(k): v for k, v in self.unfreeze_schedule.items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"unfreeze_schedule: expected integer steps as keys, got {list(self.unfreeze_schedule)}"
                ) from None
        self.validate()

    def selection(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SELECTORS if getattr(self, k) is not None}

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        if self.peft_type != "LAYER_FREEZE":
            raise ValueError(f"peft_type: expected 'LAYER_FREEZE', got {self.peft_type!r}")
        _check_selection(self.selection(), "")
        if self.layers_pattern is not None and (not isinstance(self.layers_pattern, str) or not self.layers_pattern):
            raise ValueError(f"layers_pattern: expected the path of the block list, got {self.layers_pattern!r}")
        schedule = self.unfreeze_schedule
        if schedule is not None:
            if not isinstance(schedule, dict) or not schedule:
                raise ValueError(f"unfreeze_schedule: expected a non-empty dict {{step: selection}}, got {schedule!r}")
            for step, spec in schedule.items():
                if not _is_index(step) or step < 0:
                    raise ValueError(f"unfreeze_schedule: steps must be integers >= 0, got {step!r}")
                if not isinstance(spec, dict) or not spec or set(spec) - set(SELECTORS):
                    raise ValueError(
                        f"unfreeze_schedule[{step}]: expected a non-empty dict with keys among {SELECTORS}, "
                        f"got {spec!r}"
                    )
                _check_selection(spec, f"unfreeze_schedule[{step}].")
        if not self.selection() and not schedule:
            raise ValueError(f"LayerFreezeConfig: nothing to train; set one of {SELECTORS} or unfreeze_schedule")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save: expected a list of module names, got {self.modules_to_save!r}")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode: expected a bool, got {self.inference_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["unfreeze_schedule"] is not None:
            d["unfreeze_schedule"] = {str(k): v for k, v in sorted(d["unfreeze_schedule"].items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerFreezeConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"revision"})
        if unknown:
            raise ValueError(f"adapter_config.json: unknown LayerFreeze fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


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


class LayerFreezeModel(InPlaceTunerModel):
    """``model`` with the chosen tensors trainable in full, in place, and everything else frozen."""

    def _inject(self, name: str, config: LayerFreezeConfig) -> None:
        self._init_in_place()
        self._check_single(name)
        model = self.base_model.model
        saved = self._modules_to_save_paths(config)
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
        return self.base_model.model

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
        if not _is_index(step) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        wanted = set(self._base_keys)
        for at, keys in self._stages.items():
            if at <= step:
                wanted |= set(keys)
        new = [k for k in self._live if k in wanted and k not in self._unfrozen]
        self._unfrozen = wanted
        self._mark_trainable()
        return [k[len(PREFIX) :] for k in new]

    def trained_parameter_names(self) -> list[str]:
        """Names (in the user's model) of the tensors that train now."""
        return [k[len(PREFIX) :] for k in self._live if k in self._unfrozen]


register_peft_type("LAYER_FREEZE", LayerFreezeConfig, LayerFreezeModel)
