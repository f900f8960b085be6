"""LoraConfig: the LoRA hyper-parameters, with Hugging Face PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..matching import check_patterns, check_regex

INIT_CHOICES = (True, False, "gaussian", "pissa")
BIAS_CHOICES = ("none", "all", "lora_only")
# Fields this package does not implement; a config that sets them is refused rather than ignored.
_UNSUPPORTED_WHEN_SET = (
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "megatron_config",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "target_parameters",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "use_bdlora",
)
_UNSUPPORTED_WHEN_TRUE = ("use_qalora", "lora_bias", "ensure_weight_tying")


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (``W x + b  →  W x + b + s·B·A·dropout(x)``).

    Args:
        r: rank of the update (positive int).
        lora_alpha: ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: module names to adapt: a list of names matched against the end of each module path
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regex matched against the full
            path, or ``"all-linear"`` (every linear layer but the output head).
        exclude_modules: the same kinds of patterns, for modules never to adapt.
        layers_to_transform: only adapt modules inside these layer indices (``layers.<i>.`` / ``h.<i>.``).
        layers_pattern: the name of the layer list when it is not one of layers/h/blocks/layer.
        rank_pattern / alpha_pattern: ``{pattern: r}`` / ``{pattern: alpha}`` overrides per module,
            a pattern matching the end of a module path as a regex.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA: a trainable magnitude per output row times the direction of
            ``W + s·B·A`` (the norm is detached, as in PEFT).
        bias: which biases train: 'none', 'all', or 'lora_only' (those of adapted layers).
        modules_to_save: modules (by name, like ``target_modules``) trained in full and saved with the
            adapter.
        init_lora_weights: True (A Kaiming-uniform, B = 0), 'gaussian' (A ~ N(0, 1/r), B = 0), False (both
            random: the adapter is not the identity; for tests), or 'pissa' (A, B from the top-r SVD of W,
            W replaced by its residual).
        fan_in_fan_out: the base weight is stored [in, out] (transformers' Conv1D); set automatically when
            such a layer is adapted.
        tie_lora_A: one A per module name shared by every layer (all ``q_proj`` share one A, all
            ``v_proj`` another), each layer keeping its own B; the A's gradient sums over the layers. Not a
            PEFT field: saved once per module name as ``base_model.model.tied_lora_A.<name>.weight``.
        tie_lora_B: the same for B (with tie_lora_A: one LoRA shared by every layer).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | Literal["gaussian", "pissa"] = True
    fan_in_fan_out: bool = False
    tie_lora_A: bool = False
    tie_lora_B: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type: expected 'LORA', got {self.peft_type!r}")
        _check_rank("r", self.r)
        _check_number("lora_alpha", self.lora_alpha)
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not (0.0 <= self.lora_dropout < 1.0)
        ):
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {self.lora_dropout!r}")
        check_patterns("target_modules", self.target_modules, allow_none=True)
        check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.layers_to_transform is not None:
            if not isinstance(self.layers_to_transform, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform
            ):
                raise ValueError(
                    "layers_to_transform: expected a non-negative int or a list of them, "
                    f"got {self.layers_to_transform!r}"
                )
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
                raise ValueError(
                    "layers_to_transform: cannot be combined with a regex target_modules "
                    "(put the layer indices in the regex instead)"
                )
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern: only meaningful together with layers_to_transform")
            check_patterns("layers_pattern", self.layers_pattern, allow_none=False)
        for name, table, check in (
            ("rank_pattern", self.rank_pattern, _check_rank),
            ("alpha_pattern", self.alpha_pattern, _check_number),
        ):
            if not isinstance(table, dict):
                raise ValueError(f"{name}: expected a dict {{pattern: value}}, got {type(table).__name__}")
            for key, value in table.items():
                check_regex(f"{name} key", key)
                check(f"{name}[{key!r}]", value)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias: expected one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.modules_to_save is not None:
            check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        init = self.init_lora_weights
        if not (init is True or init is False or init in ("gaussian", "pissa")):
            raise ValueError(f"init_lora_weights: expected True, False, 'gaussian' or 'pissa', got {init!r}")
        if init == "pissa" and self.use_dora:
            raise ValueError("init_lora_weights: 'pissa' cannot be combined with use_dora=True")
        if init == "pissa" and (self.tie_lora_A or self.tie_lora_B):
            raise ValueError("init_lora_weights: 'pissa' derives A and B from each layer's W; it cannot tie them")
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "tie_lora_A", "tie_lora_B"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected a bool, got {getattr(self, flag)!r}")

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (r**0.5 if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("tie_lora_A", "tie_lora_B"):  # not PEFT fields: written only when set
            if not d[name]:
                del d[name]
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Build from an adapter_config.json dict (PEFT's or ours). Fields of PEFT's that this package does
        not implement are accepted when they hold their neutral value and refused otherwise."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in _UNSUPPORTED_WHEN_SET:
            if d.get(k) not in (None, {}, [], False):
                raise ValueError(f"adapter_config.json: {k}={d[k]!r} is not supported by pyfastpeft")
        for k in _UNSUPPORTED_WHEN_TRUE:
            if d.get(k):
                raise ValueError(f"adapter_config.json: {k}=True is not supported by pyfastpeft")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not LORA")
        return cls(**kwargs)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
