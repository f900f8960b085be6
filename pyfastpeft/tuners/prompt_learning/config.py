"""Configs of the prompt-learning methods, with Hugging Face PEFT's field names, defaults and
``peft_type``: prompt tuning (``PromptTuningConfig``), P-tuning (``PromptEncoderConfig``) and prefix tuning
(``PrefixTuningConfig``).

``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules`` describe the base
model; left at None they are filled in from the model when the adapter is added (as PEFT does, and as it
writes them to adapter_config.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM")
PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
REPARAMETERIZATIONS = ("MLP", "LSTM")


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _enum_value(value: Any) -> Any:
    # PEFT's enums are str subclasses; keep the plain string
    return getattr(value, "value", value)


@dataclass
class PromptLearningConfig:
    """The fields every prompt-learning method shares.

    Args:
        num_virtual_tokens: how many virtual tokens (prompt length or prefix length); required.
        token_dim: the base model's hidden size (for prefix tuning with grouped-query attention:
            ``head_dim × num_key_value_heads``, as PEFT sets it).
        num_transformer_submodules: 1, or 2 for encoder-decoders (``SEQ_2_SEQ_LM``: prompt tuning and
            P-tuning then keep a table of 2 × num_virtual_tokens rows, of which the encoder gets the first
            num_virtual_tokens, as in PEFT).
        num_attention_heads: attention heads of the base model (key/value heads for prefix tuning).
        num_layers: transformer blocks of the base model.
        modules_to_save: modules trained in full and saved with the adapter (``SEQ_CLS`` adds the
            classifier head, as in PEFT).
        task_type: "CAUSAL_LM" (None is read as it), "SEQ_CLS" (a transformers
            ``...ForSequenceClassification``) or "SEQ_2_SEQ_LM" (T5, BART: the virtual tokens go to the
            encoder; prefix tuning's to the decoder's self-attention).
        inference_mode: the adapter is frozen (set when loading without ``is_trainable``).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = field(default="", init=False)

    PEFT_TYPE = ""

    def __post_init__(self):
        self.peft_type = self.PEFT_TYPE
        self.task_type = _enum_value(self.task_type)

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_int(name, getattr(self, name), allow_none=True)
        if self.task_type not in TASK_TYPES:
            raise ValueError(
                f"task_type: expected one of {', '.join(t for t in TASK_TYPES if t)}, got {self.task_type!r}"
            )
        allowed = (None, 1, 2) if self.task_type == "SEQ_2_SEQ_LM" else (None, 1)
        if self.num_transformer_submodules not in allowed:
            raise ValueError(
                f"num_transformer_submodules: expected one of {allowed} for task_type {self.task_type!r}, got "
                f"{self.num_transformer_submodules!r}"
            )
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(n, str) and n for n in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save: expected a list of module names, got {self.modules_to_save!r}")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode: expected a bool, got {self.inference_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptLearningConfig:
        """Build from an adapter_config.json dict (PEFT's or ours); PEFT's bookkeeping keys
        (``auto_mapping``, ``peft_version``, ...) are ignored."""
        if d.get("peft_type", cls.PEFT_TYPE) != cls.PEFT_TYPE:
            raise ValueError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not {cls.PEFT_TYPE}")
        known = {f for f, spec in cls.__dataclass_fields__.items() if spec.init}
        return cls(**{k: _enum_value(v) for k, v in d.items() if k in known})


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: "RANDOM" (N(0, 1) like a fresh nn.Embedding), "SAMPLE_VOCAB" (embeddings of
            random vocabulary tokens) or "TEXT" (embeddings of a text's tokens, repeated or truncated to
            ``num_virtual_tokens`` as PEFT does).
        prompt_tuning_init_text: the text for "TEXT", tokenized with ``tokenizer_name_or_path``.
        tokenizer_name_or_path / tokenizer_kwargs: the tokenizer for "TEXT" (transformers'
            AutoTokenizer, local files only).
        prompt_tuning_init_token_ids: for "TEXT" on a model without a tokenizer (the built-in one): the
            token ids of the init text, used instead of a tokenizer.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    prompt_tuning_init_token_ids: list[int] | None = None

    PEFT_TYPE = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()
        self.prompt_tuning_init = _enum_value(self.prompt_tuning_init)

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(
                f"prompt_tuning_init: expected one of {', '.join(PROMPT_TUNING_INITS)}, got {self.prompt_tuning_init!r}"
            )
        ids = self.prompt_tuning_init_token_ids
        if ids is not None and (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
            raise ValueError(f"prompt_tuning_init_token_ids: expected a non-empty list of token ids, got {ids!r}")
        if self.prompt_tuning_init == "TEXT" and ids is None:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "tokenizer_name_or_path: required when prompt_tuning_init='TEXT' "
                    "(or give prompt_tuning_init_token_ids)"
                )
            if self.prompt_tuning_init_text is None:
                raise ValueError("prompt_tuning_init_text: required when prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("tokenizer_kwargs: only valid when prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["prompt_tuning_init_token_ids"] is None:
            del d["prompt_tuning_init_token_ids"]  # PEFT's file has no such key
        return d


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings passed through a prompt encoder before being prepended.

    Args:
        encoder_reparameterization_type: "MLP" (Linear-ReLU-Linear-ReLU-Linear) or "LSTM" (a
            bidirectional LSTM, then Linear-ReLU-Linear).
        encoder_hidden_size: the encoder's hidden size (None: ``token_dim``).
        encoder_num_layers: LSTM layers (PEFT ignores it for the MLP, which always has 2 hidden layers).
        encoder_dropout: dropout between the LSTM's layers.
    """

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    PEFT_TYPE = "P_TUNING"

    def __post_init__(self):
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(self.encoder_reparameterization_type)

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in REPARAMETERIZATIONS:
            raise ValueError(
                f"encoder_reparameterization_type: expected one of {', '.join(REPARAMETERIZATIONS)}, "
                f"got {self.encoder_reparameterization_type!r}"
            )
        _positive_int("encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        _positive_int("encoder_num_layers", self.encoder_num_layers)
        p = self.encoder_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"encoder_dropout: expected a probability in [0, 1), got {p!r}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: per layer, ``num_virtual_tokens`` learned keys and values every token attends to.

    Args:
        prefix_projection: produce the prefixes with an MLP (Embedding → Linear-Tanh-Linear) instead of
            learning them directly.
        encoder_hidden_size: that MLP's hidden size (None: ``token_dim``).
        init_weights: None (random) or "zero" (zero prefixes: keys and values of zeros, not a no-op
            for softmax attention but PEFT's definition).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    PEFT_TYPE = "PREFIX_TUNING"

    def validate(self) -> None:
        super().validate()
        _positive_int("encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection: expected a bool, got {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights: expected None or 'zero', got {self.init_weights!r}")
