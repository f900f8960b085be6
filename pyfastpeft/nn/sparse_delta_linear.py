"""Sparse fine-tuning: ``W = W₀ + Δ`` with Δ non-zero at k fixed flat indices; index selection and
regrowth.

Only ``delta`` ([k]) trains, so gradients and optimizer state scale with k; the backward computes Δ's
gradient at the k indices only (pyfastpeft.ops.sparse_delta_linear). Dense weight gradients exist only
while scores for selection or regrowth are gathered (:func:`gradient_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..ops.sparse import sparse_delta_linear

STRATEGIES = ("magnitude", "random", "gradient", "fisher")


def select_indices(
    weight: torch.Tensor,
    k: int,
    strategy: str = "magnitude",
    scores: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted int64 flat indices of the k entries to train.

    ``magnitude``: the largest |W₀|; ``random``: uniformly at random; ``gradient`` / ``fisher``: the
    largest ``scores`` (from :func:`gradient_scores`). ``exclude`` (bool, weight-shaped) marks entries
    that may not be chosen, e.g. pruned weights.
    """
    numel = weight.numel()
    if not 0 <= k <= numel:
        raise ValueError(f"k: expected 0 <= k <= {numel} (the weight's size), got {k}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy == "magnitude":
        score = weight.detach().abs().flatten().float()
    elif strategy == "random":
        score = torch.rand(numel, generator=generator, device="cpu").to(weight.device)
    else:
        if scores is None or scores.shape != weight.shape:
            raise ValueError(
                f"scores: strategy {strategy!r} needs weight-shaped scores {tuple(weight.shape)}, "
                f"got {None if scores is None else tuple(scores.shape)}"
            )
        score = scores.detach().flatten().float().clone()
    if exclude is not None:
        score = score.masked_fill(exclude.flatten().to(score.device), float("-inf"))
        if k > numel - int(exclude.sum()):
            raise ValueError(f"k: {k} exceeds the {numel - int(exclude.sum())} entries not excluded")
    return torch.topk(score, k, sorted=False).indices.sort().values


@torch.enable_grad()
def gradient_scores(
    modules: Iterable[nn.Linear | SparseDeltaLinear],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    kind: str = "fisher",
) -> list[torch.Tensor]:
    """Per-weight scores accumulated over a few batches: Σ|g| (``gradient``) or Σg² (``fisher``, the
    empirical Fisher diagonal). Dense weight gradients are computed only here: each module's weight
    requires grad for the duration, then returns to its previous state. ``loss_fn(batch)`` runs the model
    and returns the loss."""
    if kind not in ("gradient", "fisher"):
        raise ValueError(f"kind: expected 'gradient' or 'fisher', got {kind!r}")
    modules = list(modules)
    weights = [m.weight for m in modules]
    saved = [(w.requires_grad, w.grad) for w in weights]
    scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            loss_fn(batch).backward()
            for s, w in zip(scores, weights, strict=True):
                if w.grad is not None:
                    g = w.grad.float()
                    s.add_(g.abs() if kind == "gradient" else g * g)
                    w.grad = None
    finally:
        for w, (req, grad) in zip(weights, saved, strict=True):
            w.requires_grad_(req)
            w.grad = grad
    return scores


class SparseDeltaLinear(nn.Module):
    """``y = x·(W₀ + Δ)ᵀ + b`` with W₀ frozen and Δ trainable at k sorted flat indices.

    Build it from an ``nn.Linear`` with :meth:`from_linear`. ``delta`` starts at zero, so the layer
    starts as the base layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight: expected [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._set_indices(indices)
        self.delta = nn.Parameter(torch.zeros(self.indices.numel(), dtype=weight.dtype, device=weight.device))

    def _set_indices(self, indices: torch.Tensor) -> None:
        indices = indices.to(self.weight.device)
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
            raise ValueError(
                f"indices: expected a 1-D int64 or int32 tensor, got {indices.dtype} {tuple(indices.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.weight.numel()):
            raise ValueError(f"indices: out of range for a weight with {self.weight.numel()} elements")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("indices: expected strictly increasing (sorted, no duplicate) flat indices")
        self.register_buffer("indices", indices.contiguous(), persistent=True)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        density: float | None = None,
        k: int | None = None,
        strategy: str = "magnitude",
        scores: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SparseDeltaLinear:
        """Wraps ``linear`` (its weight and bias are shared, frozen) with k = ``density``·numel (or ``k``)
        trainable entries chosen by ``strategy`` (see :func:`select_indices`)."""
        if (density is None) == (k is None):
            raise ValueError("density, k: give exactly one of them")
        if density is not None:
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density: expected a value in (0, 1], got {density}")
            k = max(1, round(density * linear.weight.numel()))
        idx = select_indices(linear.weight, k, strategy, scores, exclude, generator)
        return cls(linear.weight, linear.bias, idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_delta_linear(x, self.weight, self.bias, self.delta, self.indices)

    def delta_weight(self) -> torch.Tensor:
        """Δ as a dense ``[out, in]`` tensor (for inspection and merging)."""
        dense = torch.zeros(self.weight.numel(), dtype=self.weight.dtype, device=self.weight.device)
        dense[self.indices.long()] = self.delta.detach()
        return dense.view_as(self.weight)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Writes Δ into W₀ and returns the plain ``nn.Linear`` holding W₀ + Δ (the bias is shared)."""
        self.weight.view(-1).index_add_(0, self.indices, self.delta.to(self.weight.dtype))
        self.delta.zero_()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def report(self) -> dict[str, int]:
        """``trainable``: k; ``changed``: entries where W₀ + Δ differs from W₀; ``total``: out·in."""
        merged = self.weight.detach().view(-1).index_add(0, self.indices, self.delta.detach())
        changed = int((merged != self.weight.detach().view(-1)).sum())
        return {"trainable": self.delta.numel(), "changed": changed, "total": self.weight.numel()}

    @torch.no_grad()
    def regrow(self, scores: torch.Tensor, fraction: float, optimizer: Any | None = None) -> int:
        """Drops the ``fraction``·k entries with the smallest |Δ| (their Δ is discarded, W₀ untouched)
        and grows as many new entries where ``scores`` is largest among the unselected ones; k stays
        fixed. Moments in ``optimizer`` (a SparseAdamW) follow the kept entries; new entries start from
        zero. Returns the number of entries replaced."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: expected a value in [0, 1], got {fraction}")
        if scores.shape != self.weight.shape:
            raise ValueError(f"scores: expected shape {tuple(self.weight.shape)}, got {tuple(scores.shape)}")
        k = self.delta.numel()
        n_swap = min(int(fraction * k), self.weight.numel() - k)
        if n_swap == 0:
            return 0
        keep = torch.topk(self.delta.detach().abs().float(), k - n_swap, sorted=False).indices
        candidate = scores.detach().flatten().float().clone()
        candidate[self.indices.long()] = float("-inf")
        grown = torch.topk(candidate, n_swap, sorted=False).indices
        old_idx = self.indices.long()
        flat = torch.cat([old_idx[keep], grown])
        source = torch.cat([keep, torch.full_like(grown, -1)])  # old position of each new entry, or -1
        order = flat.argsort()
        flat, source = flat[order], source[order]
        new_delta = torch.where(
            source >= 0,
            self.delta.detach()[source.clamp(min=0)],
            torch.zeros((), dtype=self.delta.dtype, device=self.delta.device),
        )
        self.indices = flat.to(self.indices.dtype)
        self.delta.data = new_delta
        if optimizer is not None:
            optimizer.reindex_(self.delta, source)
        return n_swap

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.delta.numel()}"
