"""The LoRA linear layer: the one class that adds LoRA to an ``nn.Linear``, transformers' Conv1D or a
(fake-)quantized linear, whether ``get_peft_model`` installs it or a user builds one directly.

It holds several named adapters. Parameter names follow Hugging Face PEFT's in-memory layout
(``<path>.lora_A.<adapter>.weight``, ``lora_B``, ``lora_magnitude_vector.<adapter>.weight``), so state
dicts map one-to-one onto PEFT's files. Its modes, all in this class:

- one active adapter: one call of the fused op :func:`pyfastpeft.ops.lora_linear` (the frozen product,
  the rank-r products and the dropout in one pass; the backward regenerates the mask);
- a quantized or fake-quantized base (QLoRA / QA-LoRA style): the same op over the base's quantized
  weight and activations;
- a GGUF block base: the block kernel for the base product, the rank-r products added (DoRA's row norm
  from :mod:`.block_base`, never from the float weight);
- a mixed-adapter batch (one adapter per sequence, ``adapter_names``): one call of the multi-adapter op
  :func:`pyfastpeft.ops.multi_lora_linear` over every sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn.fake_quant_linear import FakeQuantLinear
from ...nn.gguf import GGUFLinear
from ...nn.quantized_linear import QuantizedLinear
from ...ops import BASE_ADAPTER, kernel_layout
from ..layers import BaseLayerPassthrough, is_conv1d
from .block_base import BlockBaseForward
from .config import LoraConfig

QUANTIZED_BASES = (FakeQuantLinear, QuantizedLinear)
# Bases whose weight stays in GGUF blocks: the base product is their own fused kernel, the update is added.
BLOCK_BASES = (GGUFLinear,)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when t already has it (a layer's forward casts four tensors)."""
    return t if t.dtype == dtype else t.to(dtype)


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

    def check_mergeable(self, names: list[str] | None = None) -> None:
        """Raises if this layer cannot merge (a model checks every layer before merging any)."""

    def unmerge(self) -> None:  # pragma: no cover - per layer kind
        raise NotImplementedError

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Under autocast the op must see one dtype, as F.linear would after autocast's cast.
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.is_floating_point() else self.base_weight_dtype()

    def base_weight_dtype(self) -> torch.dtype:
        return self.base_layer.weight.dtype


class LoraLinear(BlockBaseForward, LoraLayer):
    """LoRA on ``nn.Linear`` (weight [out, in]), Conv1D (weight [in, out], ``fan_in_fan_out``), or a frozen
    ``FakeQuantLinear`` / ``QuantizedLinear`` / ``GGUFLinear``.

    One active adapter: ``y = W x + b + s·B·A·dropout(x)`` in one fused op. DoRA: ``y = b + m / ‖W + s·B·A‖
    ⊙ (W x + s·B·A·dropout(x))`` with the row norm detached (PEFT's choice); without dropout (eval, or
    p = 0) this is exactly PEFT's DoRA output; in training with dropout PEFT instead applies the dropout
    to the rescaled base branch too, which costs it a second full product. Several active adapters: W x + b
    once, each adapter's update added to it (DoRA's: ``(k - 1)·W x + k·s·B·A·dropout(x)``, k its row
    factor, so that with W x it is the adapter's own result); PEFT's DoRA rescales the sum so far instead
    of W x, which makes its result depend on the adapters' order.

    Built directly, as Hugging Face PEFT's ``lora.Linear``, it holds one adapter, active and trainable::

        layer = LoraLinear(nn.Linear(1024, 1024), r=16, lora_alpha=32, lora_dropout=0.05)
        layer.update_layer("fr", 8, 16.0, 0.05, False, False, True)   # more adapters: PEFT's update_layer
        y = layer(x)                                                  # the active adapter ("default")
        y = layer(x, adapter_names=["default", "fr", "__base__"])     # one adapter per sequence of x

    Args:
        base_layer: the layer to adapt; its parameters are frozen.
        adapter_name: the first adapter's name.
        r: its rank; ``None`` (``get_peft_model``'s use) leaves the layer without adapters, for
            ``update_layer`` to add them.
        lora_alpha: ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``); the other
            arguments are :class:`LoraConfig`'s fields of the same names, with its defaults.
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int | None = None,
        lora_alpha: float = LoraConfig.lora_alpha,
        lora_dropout: float = LoraConfig.lora_dropout,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
    ):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # A frozen (fake-)quantized base (QLoRA / QA-LoRA style): the op sees its quantized weight and
        # quantized activations; the adapter trains in the base's float dtype and is never merged into it.
        self.quantized_base = isinstance(base_layer, QUANTIZED_BASES)
        # A GGUF block base: its weight is never de-quantized whole; y = base(x) + s·B·A·dropout(x).
        self.block_base = isinstance(base_layer, BLOCK_BASES)
        if self.block_base:
            # DoRA's ‖W_i‖² of the frozen blocks, float64, computed on first use; not saved with the adapter
            self.register_buffer("block_row_sq_norms", None, persistent=False)
            self._block_row_sq_version = -1
        self._mixed_stack_cache: tuple | None = None  # (key, (A, B)) of mixed batches with autograd off
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear) or self.quantized_base or self.block_base:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            raise ValueError(
                "base_layer: expected nn.Linear, transformers' Conv1D, FakeQuantLinear, QuantizedLinear or GGUFLinear, "
                f"got {type(base_layer).__name__}"
            )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora_merge_norm: dict[str, torch.Tensor] = {}
        if r is None:
            return
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE_ADAPTER:
            raise ValueError(
                f"adapter_name: expected a non-empty name without '.', other than {BASE_ADAPTER!r}, "
                f"got {adapter_name!r}"
            )
        # the config's own checks, so a layer built here accepts exactly what get_peft_model does
        LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
        ).validate()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights)
        self.set_adapter([adapter_name])

    def weight_oi(self) -> torch.Tensor:
        """The base weight as [out, in] (a transposed view for Conv1D; the dequantized or fake-quantized
        weight, without gradient, for a quantized base)."""
        if self.quantized_base:
            with torch.no_grad():
                return self.base_layer.quantized_weight()
        if self.block_base:  # a new float tensor: for reports and checks, never on the forward path
            with torch.no_grad():
                return self.base_layer.dequantized_weight(torch.float32)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def base_weight_dtype(self) -> torch.dtype:
        if isinstance(self.base_layer, QuantizedLinear):
            return self.base_layer.dtype
        if self.block_base:
            return torch.float32
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
        if self.block_base and init == "pissa":
            raise ValueError(
                f"adapter {name!r}: PiSSA needs a float base weight, since it rewrites W as W - s·B·A; "
                f"{type(self.base_layer).__name__} keeps W in GGUF blocks (use LoRA or DoRA over it)"
            )
        if self.block_base:  # the adapter's dtype and device, without de-quantizing the weight
            w = torch.empty(0, dtype=torch.float32, device=self.base_layer.blocks.device)
        else:
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
        if self.block_base:
            return self._block_dora_norm(name).to(dtype or torch.float32)
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

    def check_mergeable(self, names: list[str] | None = None) -> None:
        if self.quantized_base or self.block_base:
            raise ValueError(
                f"merge: the base is a {type(self.base_layer).__name__}; merging a float update into quantized "
                "weights would requantize them. Keep the adapter separate, or merge into the float model "
                "before pyfastpeft.quant.convert"
            )

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        self.check_mergeable(names)
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

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        """``adapter_names``: one adapter per sequence along x's first dimension (``"__base__"`` for none),
        as in PEFT; a model's layers get theirs from ``PeftModel(..., adapter_names=...)``."""
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_forward(x, *self._mixed_batch_of(adapter_names))
        if self.mixed_batch is not None:
            return self._mixed_forward(x, *self.mixed_batch)
        active = self.active_adapters
        if self.merged_adapters:
            active = [n for n in active if n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.block_base:
            return self._block_forward(x, active)
        base = self._modules["base_layer"]
        if self.quantized_base:
            x = base.quantize_input(x)
        # every layer call of every step passes here: casts only where a dtype differs
        dtype = self._compute_dtype(x)
        weight = _as_dtype(self.weight_oi(), dtype)
        bias = base.bias
        bias = None if bias is None else _as_dtype(bias, dtype)
        x = _as_dtype(x, dtype)
        if len(active) == 1:
            return self._fused(x, weight, bias, active[0])
        # Several active adapters at once (rare), as PEFT: the frozen product once, each adapter's update
        # added to it; DoRA's rescales W x too, so it adds (m/‖·‖ - 1)·W x + m/‖·‖·s·B·A·dropout(x), which
        # with W x is the adapter's result alone
        wx = F.linear(x, weight)
        y = wx
        for name in active:
            u = self._update(x, name)
            if self.use_dora[name]:
                scale = self._dora_scale(name, weight, x.dtype)
                u = (scale - 1) * wx + scale * u
            y = y + u
        return y if bias is None else y + bias

    def _mixed_batch_of(self, adapter_names: list[str]) -> tuple[list[str], list[int]]:
        """(this layer's adapters, adapter index per sequence) for ``adapter_names``, checked."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(
                f"adapter_names: expected a list of adapter names, one per sequence, got {adapter_names!r}"
            )
        if self.merged_adapters:
            raise ValueError("adapter_names: unmerge the adapters first (unmerge())")
        known = self.adapters
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.r})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; adapters: {known} (or {BASE_ADAPTER!r})")
        index = {n: i for i, n in enumerate(known)}
        return known, [index.get(n, -1) for n in adapter_names]

    def _mixed_forward(self, x: torch.Tensor, names: list[str], seq_indices: list[int]) -> torch.Tensor:
        """Every sequence through its own adapter (index -1: the base alone) with the multi-adapter op.
        The stacked A and B are built from this layer's adapters with torch.stack, so gradients reach
        each adapter's own parameters."""
        if x.dim() < 2 or x.shape[0] != len(seq_indices):
            raise ValueError(
                f"adapter_names: {len(seq_indices)} names for a batch of shape {tuple(x.shape)} "
                "(expected one name per sequence, the first dimension)"
            )
        if self.block_base:
            raise ValueError(
                "adapter_names: mixed-adapter batches need a float or QuantizedLinear base; this layer's base "
                "is a GGUFLinear (run one adapter at a time over a GGUF block model)"
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
        a = _as_dtype(self._modules["lora_A"][name].weight, x.dtype)
        b = _as_dtype(self._modules["lora_B"][name].weight, x.dtype)
        p = self.dropout_p[name] if self.training else 0.0
        if not self.use_dora[name]:
            return ops.lora_linear(x, weight, bias, a, b, self.scaling[name], p)
        z = ops.lora_linear(x, weight, None, a, b, self.scaling[name], p)
        y = z * self._dora_scale(name, weight, x.dtype)
        return y if bias is None else y + bias

    def _down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``A·dropout(x)`` ``[..., r]`` in x's dtype. With dropout, :func:`pyfastpeft.ops.dropout_linear`:
        its backward regenerates the dropped input from x (which autograd holds anyway) instead of
        keeping one [tokens, in] tensor per layer, as the fused float op regenerates its mask."""
        p = self.dropout_p[name] if self.training else 0.0
        a = _as_dtype(self.lora_A[name].weight, x.dtype)
        return ops.dropout_linear(x, a, p) if p > 0.0 else F.linear(x, a)

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s·B·A·dropout(x)`` in x's dtype."""
        b = _as_dtype(self.lora_B[name].weight, x.dtype)
        return F.linear(self._down(x, name), b) * self.scaling[name]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}, "
            f"active={self.active_adapters}, merged={self.merged_adapters}, "
            f"fan_in_fan_out={self.fan_in_fan_out}"
        )
