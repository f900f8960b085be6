"""AdapterConfig: bottleneck adapters' hyper-parameters (where they sit, their size, sharing)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ...nn.bottleneck_adapter import ACTIVATIONS
from ..matching import check_layers, check_patterns

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
        check_patterns("attn_modules", self.attn_modules, allow_none=True)
        check_patterns("ffn_modules", self.ffn_modules, allow_none=True)
        if self.modules_to_save is not None:
            check_patterns("modules_to_save", self.modules_to_save, allow_none=False, allow_regex=False)
        check_layers("layers_to_transform", self.layers_to_transform)
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern: only meaningful together with layers_to_transform")
            check_patterns("layers_pattern", self.layers_pattern, allow_none=False)
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
