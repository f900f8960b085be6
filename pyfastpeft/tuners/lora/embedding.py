"""LoRA on ``nn.Embedding``, in Hugging Face PEFT's layout (``lora_embedding_A.<adapter>`` [r, num_embeddings],
``lora_embedding_B.<adapter>`` [dim, r])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``y = E[i] + s·(Aᵀ[i])·Bᵀ`` with A [r, num_embeddings], B [dim, r] (PEFT's
    layout). A row gather and a rank-r product: plain PyTorch ops, no dropout (as in PEFT)."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        if not isinstance(base_layer, nn.Embedding):
            raise ValueError(f"base_layer: expected nn.Embedding, got {type(base_layer).__name__}")
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: bool | str,
    ) -> None:
        if use_dora:
            raise ValueError(
                "use_dora: DoRA on nn.Embedding is not supported; exclude the embedding from "
                "target_modules or set use_dora=False"
            )
        if init == "pissa":
            raise ValueError("init_lora_weights: 'pissa' is not supported on nn.Embedding")
        w = self.base_layer.weight
        self.r[name], self.lora_alpha[name], self.dropout_p[name] = r, alpha, float(dropout)
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.use_dora[name] = False
        kw = {"dtype": w.dtype, "device": w.device}
        a = torch.randn(r, self.in_features, **kw)
        b = torch.randn(self.out_features, r, **kw)
        if init is not False:  # PEFT: A = 0, B ~ N(0, 1), so the update starts at zero
            a.zero_()
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        acc = torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32
        b = self.lora_embedding_B[name].detach().to(acc)
        return (b @ self.lora_embedding_A[name].detach().to(acc)).t() * self.scaling[name]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        w = self.base_layer.weight
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.r:
                continue
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight(name)).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight(name)).to(w.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
                y = self.base_layer(x, *args, **kwargs)
            return y
        if self.mixed_batch is not None:
            return self._mixed_forward(x, y)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            y = y + self._delta(name, x, y.dtype)
        return y

    def _delta(self, name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``s·(Aᵀ[ids])·Bᵀ``: the adapter's rows of A gathered with the base embedding's options."""
        base = self.base_layer
        after_a = F.embedding(
            ids,
            self.lora_embedding_A[name].t(),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return (after_a @ self.lora_embedding_B[name].t().to(after_a.dtype)).to(dtype) * self.scaling[name]

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One adapter per sequence: each adapter's rows of A are gathered for its own sequences only, and
        the update is added to those sequences' rows of the base embedding (index -1: the base alone)."""
        names, seq_indices = self.mixed_batch
        if x.dim() < 1 or x.shape[0] != len(seq_indices):
            raise ValueError(
                f"adapter_names: {len(seq_indices)} names for a batch of shape {tuple(x.shape)} "
                "(expected one name per sequence, the first dimension)"
            )
        if self.merged_adapters:
            raise ValueError("adapter_names: unmerge the adapters first (unmerge_adapter())")
        for k, name in enumerate(names):
            if name not in self.r:
                continue
            seqs = [i for i, j in enumerate(seq_indices) if j == k]
            if not seqs:
                continue
            rows = torch.tensor(seqs, dtype=torch.int64, device=x.device)
            y = y.index_add(0, rows, self._delta(name, x.index_select(0, rows), y.dtype))
        return y

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, "
            f"adapters={self.adapters}, "
            f"active={self.active_adapters}, merged={self.merged_adapters}"
        )
