"""The modules that produce virtual tokens, shaped and named as Hugging Face PEFT's so their state and
files match: :class:`PromptEmbedding` (prompt tuning), :class:`PromptEncoder` (P-tuning) and
:class:`PrefixEncoder` (prefix tuning).

Each maps virtual-token indices [B, P] to a table: [B, P, token_dim] of input embeddings, or, for the
prefix encoder, [B, P, num_layers · 2 · token_dim] of per-layer keys and values. With ``table_only`` an
encoder holds just ``embedding``, whose weight *is* the table (what PEFT saves as ``prompt_embeddings``
and builds in inference mode): a reparameterised encoder cannot be recovered from its table, so a loaded
adapter runs, and keeps training, as the table itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PromptEmbedding(nn.Module):
    """``embedding(indices)``: one learned vector per virtual token.

    ``init_embeddings`` [P, token_dim] (embeddings of vocabulary tokens) replaces the N(0, 1) start."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, init_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if init_embeddings is not None:
            self.embedding.weight = nn.Parameter(init_embeddings.detach().clone().float())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def repeat_to_length(token_ids: list[int], length: int) -> list[int]:
    """PEFT's rule for an init text of another length: truncate, or repeat and then truncate."""
    if len(token_ids) < length:
        token_ids = token_ids * math.ceil(length / len(token_ids))
    return list(token_ids[:length])


class PromptEncoder(nn.Module):
    """P-tuning: ``head(embedding(indices))`` with head an MLP (in → h → h → out, ReLU between) or a
    bidirectional LSTM followed by an MLP (2h → 2h → out)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        encoder_hidden_size: int,
        encoder_reparameterization_type: str = "MLP",
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
        table_only: bool = False,
    ):
        super().__init__()
        self.encoder_type = encoder_reparameterization_type
        self.table_only = table_only
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if table_only:
            return
        h = encoder_hidden_size
        if encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=h,
                num_layers=encoder_num_layers,
                dropout=encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        elif encoder_reparameterization_type == "MLP":
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, token_dim)
            )
        else:
            raise ValueError(
                f"encoder_reparameterization_type: expected 'MLP' or 'LSTM', got {encoder_reparameterization_type!r}"
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        if self.table_only:
            return x
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning: ``embedding(indices)`` [B, P, L·2·D] directly, or with ``prefix_projection``
    ``transform(embedding(indices))`` with transform D → hidden → L·2·D (Tanh between)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        num_layers: int,
        encoder_hidden_size: int,
        prefix_projection: bool = False,
        init_weights: str | None = None,
        table_only: bool = False,
    ):
        super().__init__()
        self.prefix_projection = prefix_projection and not table_only
        out = num_layers * 2 * token_dim
        if self.prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(), nn.Linear(encoder_hidden_size, out)
            )
            if init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)
            if init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.prefix_projection else x
