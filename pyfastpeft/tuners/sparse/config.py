"""SparseConfig: sparse fine-tuning, a trainable delta at a fixed fraction of each target weight."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..matching import check_layers, check_patterns

SELECTIONS = ("magnitude", "random")


@dataclass
class SparseConfig:
    """Configuration of sparse fine-tuning (``W = W₀ + Δ``, Δ non-zero at k fixed entries per matrix).

    Args:
        target_modules: the ``nn.Linear`` layers that get a sparse delta: a list of names matched against
            the end of each module path, or a regex matched against the full path.
        exclude_modules: the same kinds of patterns, for linears to leave alone.
        density: fraction of each target weight matrix that trains, in (0, 1]; k = round(density·numel).
        selection: which entries train at the start: the largest |W₀| ("magnitude") or uniformly at random
            ("random", from ``seed``). Data-driven selections (gradient, Fisher) re-select the entries of
            the injected layers from scores (:func:`pyfastpeft.nn.sparse_delta_linear.select_indices`).
        seed: seed of the random selection (one generator over the targets, in module order).
        layers_to_transform / layers_pattern: keep targets inside these layer indices.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    density: float = 0.02
    selection: str = "magnitude"
    seed: int = 0
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "SPARSE"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        if self.peft_type != "SPARSE":
            raise ValueError(f"peft_type: expected 'SPARSE', got {self.peft_type!r}")
        check_patterns("target_modules", self.target_modules, allow_none=False)
        check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.modules_to_save is not None:
            check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        check_layers("layers_to_transform", self.layers_to_transform)
        if self.layers_pattern is not None:
            check_patterns("layers_pattern", self.layers_pattern, allow_none=False)
        density = self.density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density: expected a fraction in (0, 1], got {density!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {self.selection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode: expected a bool, got {self.inference_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparseConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__) - {"revision"})
        if unknown:
            raise ValueError(f"adapter_config.json: unknown sparse fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
