"""BitFitConfig: which biases train."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..matching import check_patterns


@dataclass
class BitFitConfig:
    """Configuration of BitFit (train biases only).

    Args:
        target_modules: the linears whose bias trains: a list of names matched against the end of each
            module path, a regex matched against the full path, or ``"all-linear"`` (default: every
            ``nn.Linear`` but the output head).
        exclude_modules: the same kinds of patterns, for linears to leave alone.
        train_layer_norm_bias: also train the biases of ``nn.LayerNorm`` / ``nn.GroupNorm`` modules.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
    """

    target_modules: list[str] | str | None = "all-linear"
    exclude_modules: list[str] | str | None = None
    train_layer_norm_bias: bool = True
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "BITFIT"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        if self.peft_type != "BITFIT":
            raise ValueError(f"peft_type: expected 'BITFIT', got {self.peft_type!r}")
        check_patterns("target_modules", self.target_modules, allow_none=False)
        check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.modules_to_save is not None:
            check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        for flag in ("train_layer_norm_bias", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected a bool, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BitFitConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__) - {"revision"})
        if unknown:
            raise ValueError(f"adapter_config.json: unknown BitFit fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
