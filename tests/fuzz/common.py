"""What every fuzz test shares: the two Hypothesis profiles, tensors drawn in any memory layout, and the
error rule (ours against float64 within a multiple of plain PyTorch's error in the same dtype).

``PYFASTPEFT_FUZZ=long`` selects the long profile: many more examples, freshly drawn on every run. The
default profile is fixed (derandomized) and small enough for CI.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.conftest import low_precision_error_bound

LONG = os.environ.get("PYFASTPEFT_FUZZ", "").lower() == "long"

FUZZ = settings(
    max_examples=300 if LONG else 30,
    derandomize=not LONG,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# every dtype an op takes; float64 is the gradcheck dtype and must be as exact as the reference
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
dtypes = st.sampled_from(DTYPES)
# Every dimension starts at 0: rows, batch and sequence, and the feature dimensions (in/out features,
# the IA3 width, hidden sizes). The one exception is the vocabulary of the KD losses: a distribution over
# no classes has no value, and the ops refuse it (docs/errors.md).
FEATURES_MIN = 0
VOCAB_MIN = 1
seeds = st.integers(0, 2**31 - 1)

# How a tensor of a given logical shape lies in memory: packed, dimensions stored in reverse order
# (a transpose), every other element of the last or first dimension (a slice with a step), behind a
# storage offset, or broadcast along the first dimension (stride 0).
LAYOUTS = ["contiguous", "transposed", "step_last", "step_first", "offset", "broadcast"]
layouts = st.sampled_from(LAYOUTS)
# what a trainable tensor may be: a leaf that owns its storage or a view of one, never stride 0
# (a broadcast leaf that receives an update is not a parameter anyone has)
PARAM_LAYOUTS = LAYOUTS[:-1]
param_layouts = st.sampled_from(PARAM_LAYOUTS)


def values(shape: Sequence[int], seed: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal float64 values (a fixed function of shape and seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with ``t``'s shape and values in the given layout (t itself when the layout cannot apply)."""
    shape = tuple(t.shape)
    if t.dim() == 0:
        return t.clone()
    if layout == "transposed" and t.dim() >= 2:
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    if layout == "step_last":
        wide = t.new_zeros((*shape[:-1], 2 * shape[-1]))
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "step_first":
        tall = t.new_zeros((2 * shape[0], *shape[1:]))
        tall[::2] = t
        return tall[::2]
    if layout == "offset":
        bigger = t.new_zeros((shape[0] + 1, *shape[1:]))
        bigger[1:] = t
        return bigger[1:]
    if layout == "broadcast" and shape[0] > 0:
        return t[:1].clone().expand(shape)
    return t.clone()


def tensor(shape: Sequence[int], dtype: torch.dtype, layout: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Random values rounded to ``dtype``, in ``layout``. A broadcast layout repeats the first row, so
    the values are those of the view, whatever the layout."""
    return laid_out(values(shape, seed, scale).to(dtype), layout)


def forward_backward(
    fn: Callable,
    tensors: Sequence[torch.Tensor | None],
    trainable: Sequence[bool],
    cotangent: torch.Tensor,
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    **kwargs,
) -> list[torch.Tensor]:
    """``[fn(*tensors), d/d(each trainable tensor)]`` with the cotangent ``convert(cotangent)``; every
    tensor goes through ``convert`` first (the identity keeps each memory layout)."""
    leaves = []
    for t, train in zip(tensors, trainable, strict=True):
        if t is None or not isinstance(t, torch.Tensor):
            leaves.append(t)
        else:
            leaves.append(convert(t).detach().requires_grad_(train))
    out = fn(*leaves, **kwargs)
    wrt = [leaf for leaf, train in zip(leaves, trainable, strict=True) if train and leaf is not None]
    if not wrt:
        return [out.detach()]
    grads = torch.autograd.grad(out, wrt, convert(cotangent), allow_unused=True)
    # a reference that never touches a tensor (an adapter without tokens) gives None: a zero gradient
    return [out.detach(), *(torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt, strict=True))]


def absolute(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs()


def assert_close_to_float64(
    name: str,
    ours: torch.Tensor | None,
    torch_lowp: torch.Tensor,
    ref64: torch.Tensor,
    magnitude: torch.Tensor | None = None,
    factor: float = 2.0,
    terms: int = 1,
) -> None:
    """Our error against the float64 reference at most ``factor`` times plain PyTorch's in the same
    dtype, plus two roundings of the dtype at the size of the sums' absolute terms (``magnitude``), plus
    the error any summation order may make: ``terms`` (the length of the result's longest chain of
    sums) units of the accumulation type (float32; float64 for float64) times the same size. Plain
    PyTorch's own order can be luckier than another valid one: a sum of equal terms (a broadcast
    input), summed pairwise by PyTorch and row after row by a kernel, differs by a few units."""
    assert ours is not None, f"{name}: no gradient"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref64.shape)}"
    assert ours.dtype == torch_lowp.dtype, f"{name}: dtype {ours.dtype}, expected {torch_lowp.dtype}"
    if ours.numel() == 0:
        return
    ref_finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(ours), ref_finite), f"{name}: non-finite where the reference is finite"
    if not ref_finite.all():
        return
    err, bound = low_precision_error_bound(ours.detach(), torch_lowp.detach(), ref64.detach(), factor, magnitude)
    size = (ref64 if magnitude is None else magnitude).abs().max().item()
    bound += terms * torch.finfo(torch.float64 if ours.dtype == torch.float64 else torch.float32).eps * size
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({ours.dtype}, shape {tuple(ours.shape)})"


def compare_all(names, ours, lowp, ref64, magnitudes, factor: float = 2.0, terms: int = 1) -> None:
    for args in zip(names, ours, lowp, ref64, magnitudes, strict=True):
        assert_close_to_float64(*args, factor=factor, terms=terms)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
