"""MultiLoRALinear: one frozen nn.Linear with several named LoRA adapters, and mixed-adapter batches.

Every token picks its adapter (or none), and one op call computes the whole batch, forward and
backward, so several adapters can be served or trained together::

    layer = MultiLoRALinear(nn.Linear(1024, 1024))
    layer.add_adapter("fr", r=16, alpha=32)
    layer.add_adapter("de", r=8, alpha=16)
    y = layer(x, adapter_names=["fr", "__base__", "de", "fr"])   # one name per sequence of x [4, T, in]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import ops

BASE_ADAPTER = "__base__"
"""The name that selects the base layer alone (adapter index -1)."""


def adapter_indices_from_names(
    names_per_sequence: Sequence[str],
    adapter_names: Sequence[str],
    tokens_per_sequence: int | Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Map one adapter name per sequence to one int64 index per token.

    Args:
        names_per_sequence: the adapter of each sequence; ``"__base__"`` means no adapter (index -1).
        adapter_names: the adapters in index order (``MultiLoRALinear.adapter_names``).
        tokens_per_sequence: the length of every sequence, or a list of lengths (packed, ragged batches).
        device: where the index tensor goes.

    Returns:
        ``[sum of lengths]`` int64: sequence ``i``'s tokens all carry the index of ``names_per_sequence[i]``.
    """
    lookup = {name: i for i, name in enumerate(adapter_names)}
    per_sequence = []
    for name in names_per_sequence:
        if name == BASE_ADAPTER:
            per_sequence.append(-1)
        elif name in lookup:
            per_sequence.append(lookup[name])
        else:
            raise ValueError(
                f"adapter_names: unknown adapter {name!r}; known adapters: {list(adapter_names)} "
                f"(and {BASE_ADAPTER!r} for none)"
            )
    if isinstance(tokens_per_sequence, int):
        lengths = [tokens_per_sequence] * len(per_sequence)
    else:
        lengths = [int(n) for n in tokens_per_sequence]
        if len(lengths) != len(per_sequence):
            raise ValueError(
                f"tokens_per_sequence: expected {len(per_sequence)} lengths (one per name), got {len(lengths)}"
            )
    if any(n < 0 for n in lengths):
        raise ValueError(f"tokens_per_sequence: lengths must be non-negative, got {lengths}")
    # Built on the host, then copied once: no device work (and no synchronisation) per sequence.
    per_token = torch.tensor(per_sequence, dtype=torch.int64).repeat_interleave(
        torch.tensor(lengths, dtype=torch.int64)
    )
    return per_token.to(device) if device is not None else per_token


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus named LoRA adapters, any mix of which one batch can use.

    ``y[n] = base(x[n]) + scaling[a] · B_a·A_a·dropout(x[n])`` with ``a`` the adapter of token ``n``,
    computed by :func:`pyfastpeft.ops.multi_lora_linear`. Adapters may have different ranks (they are
    zero-padded to the largest when stacked; the padding gets zero gradients).

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.register_buffer("_scalings", torch.empty(0, dtype=torch.float64), persistent=False)
        self._stacked_cache: tuple | None = None  # (key, (A, B)) for inference; see stacked_weights
        self._indices_cache: tuple | None = None  # (key, per-token indices) of the last adapter_names call

    @property
    def adapter_names(self) -> list[str]:
        """The adapters in index order: ``adapter_names[i]`` is index ``i`` of ``adapter_indices``."""
        return list(self.lora_A.keys())

    def add_adapter(
        self, name: str, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        """Add a LoRA adapter (``A`` Kaiming-uniform, ``B`` zero, as in Hugging Face PEFT)."""
        if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
            raise ValueError(f"name: expected a non-empty str without '.', other than {BASE_ADAPTER!r}, got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"name: adapter {name!r} already exists")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        weight = self.base_layer.weight
        A = nn.Parameter(torch.empty(r, self.in_features, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = A
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, dtype=weight.dtype, device=weight.device))
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.lora_dropout[name] = dropout
        self.scaling[name] = alpha / (math.sqrt(r) if rslora else r)
        self._refresh_scalings()
        self._stacked_cache = None

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; the indices of the adapters after it shift down by one."""
        if name not in self.lora_A:
            raise ValueError(f"name: no adapter {name!r}; adapters: {self.adapter_names}")
        del self.lora_A[name]
        del self.lora_B[name]
        for table in (self.r, self.lora_alpha, self.lora_dropout, self.scaling):
            del table[name]
        self._refresh_scalings()
        self._stacked_cache = None

    def adapter_index(self, name: str) -> int:
        """The index of adapter ``name`` (-1 for ``"__base__"``)."""
        if name == BASE_ADAPTER:
            return -1
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise ValueError(f"name: no adapter {name!r}; adapters: {self.adapter_names}") from None

    def indices_for(self, names_per_sequence: Sequence[str], tokens_per_sequence: int | Sequence[int]) -> torch.Tensor:
        """Per-token indices for one adapter name per sequence (see :func:`adapter_indices_from_names`).

        The last result is kept: a loop that sends the same names batch after batch builds (and, on a
        GPU, copies) the index tensor once."""
        device = self.base_layer.weight.device
        lengths = tokens_per_sequence if isinstance(tokens_per_sequence, int) else tuple(tokens_per_sequence)
        key = (tuple(names_per_sequence), lengths, tuple(self.lora_A.keys()), device)
        if self._indices_cache is not None and self._indices_cache[0] == key:
            return self._indices_cache[1]
        indices = adapter_indices_from_names(names_per_sequence, self.adapter_names, tokens_per_sequence, device)
        if not torch.compiler.is_compiling():
            self._indices_cache = (key, indices)
        return indices

    def _refresh_scalings(self) -> None:
        values = [self.scaling[n] for n in self.adapter_names]
        self._scalings = torch.tensor(values, dtype=torch.float64, device=self.base_layer.weight.device)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [K, r_max, in], B [K, out, r_max])``: the adapters stacked, smaller ranks zero-padded.

        With autograd off (inference) the stack is kept until an adapter changes (in-place updates
        bump the parameters' versions), so serving does not copy every adapter on every call.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._stack()
        # The containers' own parameter tables: ParameterDict.values() costs a getattr per adapter, which
        # with 32 adapters took longer than the op. A new tensor (another dtype or device, or a replaced
        # parameter) has another data pointer; an in-place update bumps the version.
        params = [*self.lora_A._parameters.values(), *self.lora_B._parameters.values()]
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            self._stacked_cache = (key, kernel_layout(*self._stack()))
        return self._stacked_cache[1]

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        r_max = max(self.r.values())
        As, Bs = [], []
        for name in self.adapter_names:
            A, B = self.lora_A[name], self.lora_B[name]
            pad = r_max - A.shape[0]
            As.append(nn.functional.pad(A, (0, 0, 0, pad)) if pad else A)
            Bs.append(nn.functional.pad(B, (0, pad)) if pad else B)
        return torch.stack(As), torch.stack(Bs)

    def forward(
        self,
        x: torch.Tensor,
        adapter_indices: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Run the batch with each token's adapter.

        Args:
            x: ``[..., in]``.
            adapter_indices: int64/int32, one index per token (shape ``x.shape[:-1]`` or ``[N]``) or one
                per sequence (shape ``[x.shape[0]]``, with x at least 3-D); -1 means no adapter.
            adapter_names: one adapter name per sequence along x's first dimension (``"__base__"``
                for none), instead of ``adapter_indices``.
        With neither, or with no adapters added, the base layer runs alone.
        """
        if adapter_names is not None:
            if adapter_indices is not None:
                raise ValueError("adapter_names: give adapter_names or adapter_indices, not both")
            if x.dim() < 2 or len(adapter_names) != x.shape[0]:
                raise ValueError(
                    f"adapter_names: expected one name per sequence ({x.shape[0] if x.dim() else 0} for x of "
                    f"shape {tuple(x.shape)}), got {len(adapter_names)}"
                )
            adapter_indices = self.indices_for(adapter_names, math.prod(x.shape[1:-1]))
        if adapter_indices is None or not self.lora_A:
            return self.base_layer(x)
        token_shape = x.shape[:-1]
        if x.dim() >= 3 and adapter_indices.dim() == 1 and adapter_indices.shape[0] == x.shape[0]:
            adapter_indices = adapter_indices[:, None].expand(x.shape[0], math.prod(token_shape[1:]))
        dropout = 0.0
        if self.training:
            rates = set(self.lora_dropout.values())
            if len(rates) > 1:
                raise ValueError(
                    f"lora_dropout: the mixed-batch op applies one dropout rate to the whole batch, but the "
                    f"adapters have different rates {self.lora_dropout}"
                )
            dropout = rates.pop()
        if self._scalings.dtype != torch.float64:  # a module-wide .to(dtype) cast the buffer
            self._refresh_scalings()
        A, B = self.stacked_weights()
        return ops.multi_lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, A, B, self._scalings, adapter_indices, dropout
        )

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, alpha={self.lora_alpha[n]})" for n in self.adapter_names)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"


def kernel_layout(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values, stored as the CPU kernels read them: A [K, r, in] as a view of Aᵀ [K, in, r]
    (when r is a whole number of 64-byte packs) and B [K, out, r] as a view of Bᵀ [K, r, out]. The op
    uses these in place instead of transposing every adapter on every call; other devices and dtypes
    keep the plain stack."""
    if A.device.type != "cpu" or A.dtype not in (torch.float32, torch.float64):
        return A, B
    lanes = 64 // A.element_size()
    if A.shape[1] % lanes == 0:
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
    return A, B.transpose(1, 2).contiguous().transpose(1, 2)
