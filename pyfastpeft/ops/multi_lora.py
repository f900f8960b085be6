"""Per-token multi-adapter LoRA linear: one frozen base layer, K adapters, one mixed batch.

Token ``n`` uses adapter ``a(n)`` (``-1``: the base layer alone)::

    y[n] = x[n]·Wᵀ + b + s[a(n)]·(dropout(x)[n]·A[a(n)]ᵀ)·B[a(n)]ᵀ

The op saves x and the rank-r product ``xa`` (float32, float64 for float64 inputs) and regenerates the
dropout mask in the backward, which returns dx, dA [K, r, in] and dB [K, out, r] (dW and db only when
they require grad), so several adapters train together in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _rng
from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyfastpeft::multi_lora_linear")
def _multi_lora_linear_fake(x, weight, bias, lora_A, lora_B, scalings, adapter_indices, dropout_p, rng_state):
    check_same_device(
        "x",
        x,
        weight=weight,
        bias=bias,
        lora_A=lora_A,
        lora_B=lora_B,
        scalings=scalings,
        adapter_indices=adapter_indices,
        rng_state=rng_state,
    )
    n_rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    xa = x.new_empty((n_rows, lora_A.shape[1]), dtype=_acc_dtype(x.dtype))
    return y, xa


@torch.library.register_fake("pyfastpeft::multi_lora_linear_backward")
def _multi_lora_linear_backward_fake(
    grad_y, x, weight, lora_A, lora_B, scalings, adapter_indices, xa, dropout_p, rng_state, output_mask
):
    check_same_device(
        "x",
        x,
        grad_y=grad_y,
        weight=weight,
        lora_A=lora_A,
        lora_B=lora_B,
        scalings=scalings,
        adapter_indices=adapter_indices,
        xa=xa,
        rng_state=rng_state,
    )

    def grad(mask: bool, shape) -> torch.Tensor:
        return x.new_empty(shape) if mask else x.new_empty((0,))

    need_dx, need_dW, need_db, need_dA, need_dB = output_mask
    return (
        grad(need_dx, x.shape),
        grad(need_dW, weight.shape),
        grad(need_db, (weight.shape[0],)),
        grad(need_dA, lora_A.shape),
        grad(need_dB, lora_B.shape),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, adapter_indices, dropout_p, rng_state = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, adapter_indices, xa, rng_state)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(xa)


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_A, lora_B, scalings, adapter_indices, xa, rng_state = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3], need[4]]
    grads = _OP.multi_lora_linear_backward(
        grad_y, x, weight, lora_A, lora_B, scalings, adapter_indices, xa, ctx.dropout_p, rng_state, mask
    )
    grads = [g if m else None for g, m in zip(grads, mask, strict=True)]
    return (*grads, None, None, None, None)


torch.library.register_autograd("pyfastpeft::multi_lora_linear", _backward, setup_context=_setup_context)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    adapter_indices: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """``x·Wᵀ + b + s[a]·(dropout(x)·A[a]ᵀ)·B[a]ᵀ`` with a per-token adapter ``a``, in one op.

    Tokens are grouped by adapter on their own device, with no host synchronisation on CUDA.

    Args:
        x: ``[..., in]`` input, any leading dimensions, any strides.
        weight: ``[out, in]`` frozen base weight (its gradient is computed only when it requires grad).
        bias: ``[out]`` or None.
        lora_A: ``[K, r, in]`` stacked adapters; lora_B: ``[K, out, r]``. Adapters of smaller rank are
            zero-padded to ``r`` (the padding receives zero gradients, so it stays zero).
        scalings: ``[K]`` per-adapter scaling (``alpha / r``), a float or integer tensor or a sequence.
        adapter_indices: int64/int32, one index per token (shape ``[N]`` or ``x.shape[:-1]``); ``-1``
            means no adapter. On the CPU an index outside ``[-1, K)`` raises ValueError; on CUDA it is
            treated as ``-1`` (checking it would synchronise with the host; see
            :func:`check_adapter_indices`).
        dropout_p: dropout on the adapters' input, one rate for the whole batch.
        seed: dropout seed (None: drawn from torch's generator); same seed, same mask on every device.
    """
    if not isinstance(scalings, torch.Tensor):
        scalings = torch.tensor([float(s) for s in scalings], dtype=torch.float64, device=x.device)
    elif not scalings.is_floating_point() and scalings.dtype != torch.bool and not scalings.is_complex():
        scalings = scalings.to(torch.float64)  # integer scalings (alpha / r can be whole) are exact in float64
    rng = _rng.rng_state(seed, x.device) if dropout_p > 0 else None
    y, _ = _OP.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_indices, float(dropout_p), rng)
    return y


def check_adapter_indices(adapter_indices: torch.Tensor, num_adapters: int) -> None:
    """Raise ValueError if any index lies outside ``[-1, num_adapters)``.

    The CPU op checks this itself; on CUDA this check reads a flag back from the device (one host
    synchronisation), so call it where indices come from untrusted code, not in the hot loop.
    """
    bad = (adapter_indices < -1) | (adapter_indices >= num_adapters)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        value = int(adapter_indices.flatten()[first])
        raise ValueError(
            f"adapter_indices: index {value} at token {first} is out of range for {num_adapters} adapters "
            f"(expected -1 for no adapter, or 0..{num_adapters - 1})"
        )


BASE_ADAPTER = "__base__"
"""The adapter name that selects the base layer alone (adapter index -1), as in Hugging Face PEFT."""


def adapter_indices_from_names(
    names_per_sequence: Sequence[str],
    adapter_names: Sequence[str],
    tokens_per_sequence: int | Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Map one adapter name per sequence to one int64 index per token, as :func:`multi_lora_linear` takes.

    Args:
        names_per_sequence: the adapter of each sequence; ``"__base__"`` means no adapter (index -1).
        adapter_names: the adapters in index order (the order of the stacked ``lora_A`` / ``lora_B``).
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


def kernel_layout(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values, stored as the CPU kernels read them: A [K, r, in] as a view of Aᵀ [K, in, r]
    (when r is a whole number of 64-byte packs) and B [K, out, r] as a view of Bᵀ [K, r, out]. The op
    uses these in place instead of transposing every adapter on every call, so a layer that serves the
    same stack many times keeps it in this layout; other devices and dtypes keep the plain stack."""
    if lora_A.device.type != "cpu" or lora_A.dtype not in (torch.float32, torch.float64):
        return lora_A, lora_B
    lanes = 64 // lora_A.element_size()
    if lora_A.shape[1] % lanes == 0:
        lora_A = lora_A.transpose(1, 2).contiguous().transpose(1, 2)
    return lora_A, lora_B.transpose(1, 2).contiguous().transpose(1, 2)
