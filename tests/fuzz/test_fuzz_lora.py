"""Fuzz: the LoRA linear (with dropout) and the mixed-adapter batch against their float64 references,
forward and backward, any shapes (0 and 1 included), layouts and dtypes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import lora_linear, multi_lora_linear, reference
from tests.fuzz.common import (
    FEATURES_MIN,
    FUZZ,
    absolute,
    compare_all,
    dtypes,
    forward_backward,
    layouts,
    numel,
    param_layouts,
    seeds,
    tensor,
)


def dropout_as_the_op_rounds(mask, p, dtype):
    """(mask, rate) for the reference. In float32 and float64 the op multiplies by 1/(1-p) rounded to the
    dtype, and so must the plain version whose error sets the bound: dividing by 1-p is another valid
    rounding, one ulp off per term, which a cancelling sum turns into more than the bound's floor."""
    if mask is None:
        return None, 0.0
    if dtype in (torch.float32, torch.float64):
        return mask.to(dtype) * (1.0 / (1.0 - p)), 0.0
    return mask.to(dtype), p


lead_shapes = st.lists(st.integers(0, 5), min_size=1, max_size=3)
features = st.integers(FEATURES_MIN, 24)


@FUZZ
@given(
    lead=lead_shapes,
    in_f=features,
    out_f=features,
    r=st.integers(1, 8),
    dtype=dtypes,
    bias=st.booleans(),
    train_weight=st.booleans(),
    p=st.sampled_from([0.0, 0.0, 0.3, 0.9]),
    scaling=st.floats(-4.0, 4.0),
    x_layout=layouts,
    w_layout=param_layouts,
    ab_layout=param_layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_lora_linear(
    lead, in_f, out_f, r, dtype, bias, train_weight, p, scaling, x_layout, w_layout, ab_layout, dy_layout, seed
):
    x = tensor((*lead, in_f), dtype, x_layout, seed)
    w = tensor((out_f, in_f), dtype, w_layout, seed + 1, max(in_f, 1) ** -0.5)
    b = tensor((out_f,), dtype, "contiguous", seed + 2) if bias else None
    a = tensor((r, in_f), dtype, ab_layout, seed + 3, max(in_f, 1) ** -0.5)
    bb = tensor((out_f, r), dtype, ab_layout, seed + 4, r**-0.5)
    dy = tensor((*lead, out_f), dtype, dy_layout, seed + 5)
    args = [x, w, b, a, bb]
    trainable = [True, train_weight, bias, True, True]
    mask = None
    if p > 0:
        mask = reference.philox_keep_mask(numel(x.shape), p, seed).reshape(x.shape)

    def ref(x, w, b, a, bb, s=scaling):
        return reference.lora_linear(x, w, b, a, bb, s, *dropout_as_the_op_rounds(mask, p, x.dtype))

    ours = forward_backward(lora_linear, args, trainable, dy, scaling=scaling, dropout_p=p, seed=seed)
    lowp = forward_backward(ref, args, trainable, dy)
    ref64 = forward_backward(ref, args, trainable, dy, lambda t: t.double())
    # the same sums over absolute values: how large the terms are that each result adds up
    mags = forward_backward(ref, args, trainable, dy, absolute, s=abs(scaling))
    names = ["y", "dx"] + (["dW"] if train_weight else []) + (["db"] if bias else []) + ["dA", "dB"]
    compare_all(names, ours, lowp, ref64, mags, terms=numel(x.shape[:-1]) + in_f + out_f + r)


@FUZZ
@given(
    rows=st.lists(st.integers(0, 70), min_size=1, max_size=2),
    in_f=features,
    out_f=features,
    r=st.integers(1, 6),
    K=st.integers(1, 5),
    dtype=dtypes,
    bias=st.booleans(),
    train_weight=st.booleans(),
    p=st.sampled_from([0.0, 0.0, 0.25]),
    index_pattern=st.sampled_from(["random", "runs", "all_base", "one_adapter"]),
    int32=st.booleans(),
    x_layout=layouts,
    ab_layout=param_layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_multi_lora_linear(
    rows, in_f, out_f, r, K, dtype, bias, train_weight, p, index_pattern, int32, x_layout, ab_layout, dy_layout, seed
):
    g = torch.Generator().manual_seed(seed)
    n = numel(rows)
    if index_pattern == "random":
        idx = torch.randint(-1, K, (n,), generator=g)
    elif index_pattern == "runs":  # one adapter per run of 40 tokens (the CPU op's in-place path)
        idx = torch.randint(-1, K, (-(-n // 40),), generator=g).repeat_interleave(40)[:n]
    elif index_pattern == "all_base":
        idx = torch.full((n,), -1)
    else:
        idx = torch.full((n,), K - 1)
    idx = idx.reshape(rows).to(torch.int32 if int32 else torch.int64)
    scalings = (torch.rand(K, generator=g, dtype=torch.float64) * 4 - 1).to(torch.float32)
    x = tensor((*rows, in_f), dtype, x_layout, seed)
    w = tensor((out_f, in_f), dtype, "contiguous", seed + 1, max(in_f, 1) ** -0.5)
    b = tensor((out_f,), dtype, "contiguous", seed + 2) if bias else None
    a = tensor((K, r, in_f), dtype, ab_layout, seed + 3, max(in_f, 1) ** -0.5)
    bb = tensor((K, out_f, r), dtype, ab_layout, seed + 4, r**-0.5)
    dy = tensor((*rows, out_f), dtype, dy_layout, seed + 5)
    args = [x, w, b, a, bb]
    trainable = [True, train_weight, bias, True, True]
    mask = None if p == 0 else reference.philox_keep_mask(numel(x.shape), p, seed).reshape(x.shape)

    def ref(x, w, b, a, bb, s=scalings):
        return reference.multi_lora_linear(x, w, b, a, bb, s, idx, *dropout_as_the_op_rounds(mask, p, x.dtype))

    ours = forward_backward(
        multi_lora_linear, args, trainable, dy, scalings=scalings, adapter_indices=idx, dropout_p=p, seed=seed
    )
    lowp = forward_backward(ref, args, trainable, dy)
    ref64 = forward_backward(ref, args, trainable, dy, lambda t: t.double())
    mags = forward_backward(ref, args, trainable, dy, absolute, s=scalings.abs())
    names = ["y", "dx"] + (["dW"] if train_weight else []) + (["db"] if bias else []) + ["dA", "dB"]
    compare_all(names, ours, lowp, ref64, mags, terms=numel(x.shape[:-1]) + in_f + out_f + r)
