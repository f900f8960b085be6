"""IA3Config: (IA)³ hyper-parameters, with Hugging Face PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..matching import check_layers, check_patterns


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
        check_patterns("target_modules", self.target_modules, allow_none=True)
        check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.feedforward_modules != []:  # [] (no feed-forward module) is a valid choice
            check_patterns("feedforward_modules", self.feedforward_modules, allow_none=True)
        if self.modules_to_save is not None:
            check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules: {extra} are not in target_modules {self.target_modules}")
        check_layers("layers_to_transform", self.layers_to_transform)
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern: only meaningful together with layers_to_transform")
            check_patterns("layers_pattern", self.layers_pattern, allow_none=False)
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
