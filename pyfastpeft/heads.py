"""Task heads on any backbone: sequence classification, regression, token classification.

``with_task_head(backbone, kind, num_labels, pooling)`` returns a :class:`TaskModel` whose head is the
submodule ``score`` (the name Hugging Face uses), so every PEFT method trains and saves it: the
PeftModel frame adds ``score`` to modules_to_save by itself (``modules_to_save=["score"]``, as in
PEFT, does the same).

Semantics, with H the backbone's last hidden states [B, T, D] and m the attention mask [B, T]:
    pooled = H[b, last position with m = 1]  ("last", decoders)
           | Σ_t m·H / Σ_t m                 ("mean")
           | H[b, 0]                         ("cls", encoders)
    classification: logits = score(pooled) [B, C];  loss = cross-entropy(logits, labels)
    regression:     logits = score(pooled) [B, C];  loss = MSE(logits, labels)  (labels [B] when C = 1)
    token:          logits = score(H) [B, T, C];    loss = cross-entropy over tokens, labels -100 ignored
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("classification", "regression", "token_classification")
POOLINGS = ("last", "mean", "cls")


@dataclass
class TaskOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class _Head(nn.Module):
    """dropout → linear [D → C]."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels: expected a positive int, got {num_labels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(h))


class ClassificationHead(_Head):
    """Sequence classification: pooled hidden state → ``num_labels`` logits (cross-entropy)."""


class RegressionHead(_Head):
    """Regression: pooled hidden state → ``num_labels`` values (MSE)."""


class TokenClassificationHead(_Head):
    """Token classification: each hidden state → ``num_labels`` logits (cross-entropy, -100 ignored)."""


HEADS = {
    "classification": ClassificationHead,
    "regression": RegressionHead,
    "token_classification": TokenClassificationHead,
}


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model_prefix") and hasattr(model, "base_model")


def _output_layer(backbone: nn.Module) -> nn.Module:
    get = getattr(backbone, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if isinstance(out, nn.Module):
        return out
    if isinstance(getattr(backbone, "lm_head", None), nn.Module):
        return backbone.lm_head
    raise ValueError(
        f"backbone: {type(backbone).__name__} is neither a Hugging Face model nor has an output layer "
        f"(get_output_embeddings() or lm_head); cannot find its last hidden states"
    )


def hidden_size_of(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"backbone: cannot tell the hidden size of {type(backbone).__name__}; pass hidden_size")


class TaskModel(nn.Module):
    """``backbone`` (its last hidden states) followed by a task head ``score``.

    Hidden states come from a Hugging Face model's bare transformer (``backbone.base_model``, e.g.
    BertModel, LlamaModel: no LM head is computed), or, for other models such as the built-in TinyLlama,
    from the input of the output layer (``get_output_embeddings()`` or ``lm_head``) captured by a forward pre-hook; the
    backbone's own logits are then computed and dropped.
    """

    task_head_names = ("score",)  # the PeftModel frame trains and saves these with any method

    def __init__(self, backbone: nn.Module, head: _Head, kind: str, pooling: str = "last"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.score = head
        self.kind = kind
        self.pooling = pooling
        self.num_labels = head.num_labels
        if not _is_hf(backbone):
            _output_layer(backbone)  # fails now, not at the first forward

    def hidden_states(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        if _is_hf(self.backbone):
            out = self.backbone.base_model(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
            )
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        captured = []
        # looked up per call: a PEFT method may have replaced the module since
        hook = _output_layer(self.backbone).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        try:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        finally:
            hook.remove()
        return captured[-1]

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = h.shape
        if self.pooling == "cls":
            return h[:, 0]
        if attention_mask is None:
            return h[:, -1] if self.pooling == "last" else h.mean(1)
        mask = attention_mask.to(h.device).bool()
        if self.pooling == "mean":
            w = mask.to(h.dtype)[..., None]
            return (h * w).sum(1) / w.sum(1).clamp_min(1)
        positions = torch.arange(t, device=h.device).expand(b, t)
        last = torch.where(mask, positions, -1).amax(1).clamp_min(0)  # right or left padding alike
        return h[torch.arange(b, device=h.device), last]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> TaskOutput:
        h = self.hidden_states(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        logits = self.score(h if self.kind == "token_classification" else self.pool(h, attention_mask))
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels)
        return TaskOutput(logits=logits, loss=loss)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            target = labels.to(logits.dtype)
            if self.num_labels == 1 and target.dim() == 1:
                target = target[:, None]
            if target.shape != logits.shape:
                raise ValueError(
                    f"labels: expected shape {list(logits.shape)} for regression, got {list(labels.shape)}"
                )
            return F.mse_loss(logits.float(), target.float())
        if self.kind == "token_classification":
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"labels: expected shape {list(logits.shape[:2])} (one per token), got {list(labels.shape)}"
                )
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"labels: expected shape {list(logits.shape[:1])} (one per sequence), got {list(labels.shape)}"
            )
        return F.cross_entropy(logits.float(), labels)


def with_task_head(
    backbone: nn.Module,
    kind: Literal["classification", "regression", "token_classification"],
    num_labels: int,
    pooling: Literal["last", "mean", "cls"] = "last",
    hidden_size: int | None = None,
    dropout: float = 0.0,
) -> TaskModel:
    """``backbone`` + a new ``kind`` head with ``num_labels`` outputs, as a :class:`TaskModel`. The head is
    created in the dtype and on the device of the backbone's parameters."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    size = hidden_size if hidden_size is not None else hidden_size_of(backbone)
    head = HEADS[kind](size, num_labels, dropout)
    ref = next(backbone.parameters(), None)
    if ref is not None:
        head.to(device=ref.device, dtype=ref.dtype)
    return TaskModel(backbone, head, kind, pooling)
