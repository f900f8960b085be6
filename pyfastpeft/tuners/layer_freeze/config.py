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

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..matching import check_regex

PREFIX = "base_model.model."
SELECTORS = (
    "layers_to_transform",
    "layer_range",
    "first_layers",
    "last_layers",
    "trainable_regex",
    "trainable_parameters",
)


def is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_selection(d: dict[str, Any], where: str) -> None:
    """Field-by-field checks of one selection (the config's own or a schedule entry)."""
    lt = d.get("layers_to_transform")
    if lt is not None and not (isinstance(lt, list) and lt and all(is_index(i) and i >= 0 for i in lt)):
        raise ValueError(f"{where}layers_to_transform: expected a non-empty list of block indices >= 0, got {lt!r}")
    lr = d.get("layer_range")
    if lr is not None:
        ok = isinstance(lr, (list, tuple)) and len(lr) == 2 and is_index(lr[0]) and lr[0] >= 0
        ok = ok and (lr[1] is None or (is_index(lr[1]) and lr[1] > lr[0]))
        if not ok:
            raise ValueError(
                f"{where}layer_range: expected [start, stop) with 0 <= start < stop (stop may be None), got {lr!r}"
            )
    for k in ("first_layers", "last_layers"):
        v = d.get(k)
        if v is not None and not (is_index(v) and v >= 1):
            raise ValueError(f"{where}{k}: expected a positive number of blocks, got {v!r}")
    rx = d.get("trainable_regex")
    if rx is not None:
        if not isinstance(rx, str) or not rx:
            raise ValueError(f"{where}trainable_regex: expected a non-empty regex string, got {rx!r}")
        check_regex(f"{where}trainable_regex", rx)
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
                if not is_index(step) or step < 0:
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
