"""LoRA layers holding several named adapters: linear (nn.Linear and transformers' Conv1D) and embedding.

Parameter names follow Hugging Face PEFT's in-memory layout (``<path>.lora_A.<adapter>.weight``,
``lora_B``, ``lora_magnitude_vector.<adapter>.weight``, ``lora_embedding_A.<adapter>``), so state dicts
map one-to-one onto PEFT's files.

The linear forward with one active adapter is one call of the fused op :func:`pyfastpeft.ops.lora_linear`
(the frozen product, the rank-r products and the dropout in one pass; the backward regenerates the mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn.fake_quant_linear import FakeQuantLinear
from ...nn.multi_lora_linear import kernel_layout
from ...nn.quantized_linear import QuantizedLinear
from ..layers import BaseLayerPassthrough, is_conv1d

QUANTIZED_BASES = (FakeQuantLinear, QuantizedLinear)


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude, one entry per output feature (PEFT stores it as ``.weight``)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLayer(BaseLayerPassthrough, nn.Module):
    """What every LoRA layer shares: the frozen ``base_layer``, per-adapter hyper-parameters, the active
    adapters, the disabled flag and the list of adapters currently merged into the base weight."""

    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        # (adapter names of the model, adapter index per sequence) while PeftModel runs a mixed batch
        self.mixed_batch: tuple[list[str], list[int]] | None = None
        self.merged_adapters: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, names: list[str]) -> None:
        """Make ``names`` the active adapters; only their parameters require grad."""
        self.active_adapters = [n for n in names if n in self.r]
        for attr in self.adapter_param_names:
            for name, holder in getattr(self, attr).items():
                params = [holder] if isinstance(holder, nn.Parameter) else list(holder.parameters())
                for p in params:
                    p.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        for attr in self.adapter_param_names:
            table = getattr(self, attr)
            if name in table:
                del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.dropout_p, self.use_dora):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - per layer kind
        raise NotImplementedError

    def merge(self, names: list[str] | None = None) -> None:  # pragma: no cover - per layer kind
        raise NotImplementedError

    def unmerge(self) -> None:  # pragma: no cover - per layer kind
        raise NotImplementedError

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Under autocast the op must see one dtype, as F.linear would after autocast's cast.
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.is_floating_point() else self.base_weight_dtype()

    def base_weight_dtype(self) -> torch.dtype:
        return self.base_layer.weight.dtype


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight [out, in]) or Conv1D (weight [in, out], ``fan_in_fan_out``).

    One active adapter: ``y = W x + b + s·B·A·dropout(x)`` in one fused op. DoRA: ``y = b + m / ‖W + s·B·A‖
    ⊙ (W x + s·B·A·dropout(x))`` with the row norm detached (PEFT's choice); without dropout (eval, or
    p = 0) this is exactly PEFT's DoRA output; in training with dropout PEFT instead applies the dropout
    to the rescaled base branch too, which costs it a second full product.
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # A frozen (fake-)quantized base (QLoRA / QA-LoRA style): the op sees its quantized weight and
        # quantized activations; the adapter trains in the base's float dtype and is never merged into it.
        self.quantized_base = isinstance(base_layer, QUANTIZED_BASES)
        self._mixed_stack_cache: tuple | None = None  # (key, (A, B)) of mixed batches with autograd off
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear) or self.quantized_base:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            raise ValueError(f"base_layer: expected nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora_merge_norm: dict[str, torch.Tensor] = {}

    def weight_oi(self) -> torch.Tensor:
        """The base weight as [out, in] (a transposed view for Conv1D; the dequantized or fake-quantized
        weight, without gradient, for a quantized base)."""
        if self.quantized_base:
            with torch.no_grad():
                return self.base_layer.quantized_weight()
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def base_weight_dtype(self) -> torch.dtype:
        if isinstance(self.base_layer, QuantizedLinear):
            return self.base_layer.dtype
        return self.base_layer.weight.dtype

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
        if self.quantized_base and (use_dora or init == "pissa"):
            raise ValueError(
                f"adapter {name!r}: DoRA and PiSSA need a float base weight; "
                f"{type(self.base_layer).__name__} is quantized (use plain LoRA over it)"
            )
        w = self.weight_oi()
        self.r[name], self.lora_alpha[name], self.dropout_p[name] = r, alpha, float(dropout)
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.use_dora[name] = use_dora
        kw = {"dtype": w.dtype, "device": w.device}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        with torch.no_grad():
            if init == "pissa":
                self._pissa_init(name)
            elif init is not False:
                if init == "gaussian":
                    nn.init.normal_(self.lora_A[name].weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
            if use_dora:
                self.lora_magnitude_vector[name] = DoraMagnitude(self._weight_norm(name).to(w.dtype))

    def _pissa_init(self, name: str) -> None:
        # W = U·S·Vᵀ; A = √S_r·V_rᵀ/√s, B = U_r·√S_r/√s, so s·B·A is W's best rank-r part and W keeps
        # the rest.
        w = self.weight_oi()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        u, s, vh = torch.linalg.svd(w.to(acc), full_matrices=False)
        r, scale = self.r[name], self.scaling[name]
        root = torch.sqrt(s[:r] / scale)
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        self._set_weight_oi(w.to(acc) - scale * (b @ a))

    def _set_weight_oi(self, new_oi: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_((new_oi.t() if self.fan_in_fan_out else new_oi).to(w.dtype))

    def _weight_norm(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Row norm of ``W + s·B·A`` (PEFT's "column norm" in the paper's [in, out] convention), detached."""
        w = self.weight_oi().detach()
        dtype = dtype or w.dtype
        ba = self.lora_B[name].weight.detach().to(dtype) @ self.lora_A[name].weight.detach().to(dtype)
        return torch.linalg.norm(w.to(dtype) + self.scaling[name] * ba, dim=1)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change of the [out, in] weight that merging ``name`` makes, in float32 (float64 for
        float64)."""
        w = self.weight_oi().detach()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        ba = self.lora_B[name].weight.detach().to(acc) @ self.lora_A[name].weight.detach().to(acc)
        delta = self.scaling[name] * ba
        if self.use_dora.get(name):
            norm = self._dora_merge_norm.get(name) if name in self.merged_adapters else None
            if norm is None:
                norm = torch.linalg.norm(w.to(acc) + delta, dim=1)
            scale = self.lora_magnitude_vector[name].weight.detach().to(acc) / norm
            base = w.to(acc)
            if name in self.merged_adapters:  # base holds scale·(W + delta) now
                base = base / scale[:, None] - delta
            delta = scale[:, None] * (base + delta) - base
        return delta

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        if self.quantized_base:
            raise ValueError(
                f"merge: the base is a {type(self.base_layer).__name__}; merging a float update into quantized "
                "weights would requantize them. Keep the adapter separate, or merge into the float model "
                "before pyfastpeft.quant.convert"
            )
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.r:
                continue
            w = self.weight_oi()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            if self.use_dora[name]:
                self._dora_merge_norm[name] = self._weight_norm(name, acc)
            self._set_weight_oi(
                w.to(acc) + self.delta_weight(name) if not self.use_dora[name] else self._dora_merged(name, acc)
            )
            self.merged_adapters.append(name)

    def _dora_merged(self, name: str, acc: torch.dtype) -> torch.Tensor:
        w = self.weight_oi().to(acc)
        ba = self.lora_B[name].weight.to(acc) @ self.lora_A[name].weight.to(acc)
        direction = w + self.scaling[name] * ba
        scale = self.lora_magnitude_vector[name].weight.to(acc) / self._dora_merge_norm[name]
        return scale[:, None] * direction

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.weight_oi()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            ba = self.lora_B[name].weight.to(acc) @ self.lora_A[name].weight.to(acc)
            if self.use_dora[name]:
                scale = self.lora_magnitude_vector[name].weight.to(acc) / self._dora_merge_norm.pop(name)
                self._set_weight_oi(w.to(acc) / scale[:, None] - self.scaling[name] * ba)
            else:
                self._set_weight_oi(w.to(acc) - self.scaling[name] * ba)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.mixed_batch is not None:
            return self._mixed_forward(x)
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.quantized_base:
            x = self.base_layer.quantize_input(x)
        dtype = self._compute_dtype(x)
        weight = self.weight_oi().to(dtype)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(dtype)
        x = x.to(dtype)
        if len(active) == 1:
            return self._fused(x, weight, bias, active[0])
        # Several active adapters at once (rare): the base product once, then each update added.
        y = F.linear(x, weight, bias)
        for name in active:
            y = y + self._fused(x, weight, None, name) - F.linear(x, weight)
        return y

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every sequence through its own adapter (index -1: the base alone) with the multi-adapter op.
        The stacked A and B are built from this layer's adapters with torch.stack, so gradients reach
        each adapter's own parameters."""
        names, seq_indices = self.mixed_batch
        if x.dim() < 2 or x.shape[0] != len(seq_indices):
            raise ValueError(
                f"adapter_names: {len(seq_indices)} names for a batch of shape {tuple(x.shape)} "
                "(expected one name per sequence, the first dimension)"
            )
        present = [n for n in names if n in self.r]
        if self.quantized_base:
            x = self.base_layer.quantize_input(x)
        dtype = self._compute_dtype(x)
        x = x.to(dtype)
        weight = self.weight_oi().to(dtype)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(dtype)
        if not present:
            return F.linear(x, weight, bias)
        rates = {self.dropout_p[n] for n in present} if self.training else {0.0}
        if len(rates) > 1:
            raise ValueError(f"adapter_names: adapters of one mixed batch must share lora_dropout, got {sorted(rates)}")
        a, b = self._mixed_stack(present, dtype)
        scalings = torch.tensor([self.scaling[n] for n in present], dtype=torch.float64, device=x.device)
        local = {n: i for i, n in enumerate(present)}
        to_local = [local.get(names[i], -1) if i >= 0 else -1 for i in seq_indices]
        per_seq = torch.tensor(to_local, dtype=torch.int64, device=x.device)
        per_token = per_seq.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).contiguous()
        dora = [n for n in present if self.use_dora[n]]
        if not dora:
            return ops.multi_lora_linear(x, weight, bias, a, b, scalings, per_token, dropout_p=rates.pop())
        # DoRA: each sequence's output rows scaled by its adapter's m / ‖W + s·B·A‖ (the norm detached, as
        # in PEFT and in the single-adapter path), 1 for plain LoRA adapters and the base; bias after.
        z = ops.multi_lora_linear(x, weight, None, a, b, scalings, per_token, dropout_p=rates.pop())
        ones = torch.ones(self.out_features, dtype=dtype, device=x.device)
        rows = [self._dora_scale(n, weight, dtype) if self.use_dora[n] else ones for n in present]
        table = torch.stack([*rows, ones])  # the last row serves the sequences with no adapter (-1)
        per_seq_scale = table[per_seq]  # [batch, out]: -1 indexes the last row
        y = z * per_seq_scale.view(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
        return y if bias is None else y + bias

    def _mixed_stack(self, present: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [K, r_max, in], B [K, out, r_max]) of the listed adapters, smaller ranks zero-padded. With
        autograd off (serving) the stack is kept, in the layout the CPU kernels read in place, until an
        adapter changes (a new tensor has a new data pointer; an in-place update bumps the version)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._stack_adapters(present, dtype)
        # the containers' own tables: attribute lookups through nn.Module cost more than the key itself
        a_mods, b_mods = self.lora_A._modules, self.lora_B._modules
        tensors = [t for n in present for t in (a_mods[n]._parameters["weight"], b_mods[n]._parameters["weight"])]
        key = (tuple(present), dtype, tuple((id(t), t.data_ptr(), t._version) for t in tensors))
        if self._mixed_stack_cache is None or self._mixed_stack_cache[0] != key:
            self._mixed_stack_cache = (key, kernel_layout(*self._stack_adapters(present, dtype)))
        return self._mixed_stack_cache[1]

    def _stack_adapters(self, present: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        r_max = max(self.r[n] for n in present)
        a = torch.stack([F.pad(self.lora_A[n].weight, (0, 0, 0, r_max - self.r[n])) for n in present]).to(dtype)
        b = torch.stack([F.pad(self.lora_B[n].weight, (0, r_max - self.r[n])) for n in present]).to(dtype)
        return a, b

    def _dora_scale(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """DoRA's per-output-row factor m / ‖W + s·B·A‖, the norm detached (PEFT's choice)."""
        a = self.lora_A[name].weight.to(dtype)
        b = self.lora_B[name].weight.to(dtype)
        norm = torch.linalg.norm(weight.detach() + self.scaling[name] * (b.detach() @ a.detach()), dim=1)
        return self.lora_magnitude_vector[name].weight.to(dtype) / norm

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        p = self.dropout_p[name] if self.training else 0.0
        if not self.use_dora[name]:
            return ops.lora_linear(x, weight, bias, a, b, self.scaling[name], p)
        z = ops.lora_linear(x, weight, None, a, b, self.scaling[name], p)
        y = z * self._dora_scale(name, weight, x.dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}, "
            f"active={self.active_adapters}, merged={self.merged_adapters}, "
            f"fan_in_fan_out={self.fan_in_fan_out}"
        )


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
