"""Fuzz: the sparse-delta linear and the sampled weight gradient against their float64 references,
forward and backward, any shapes (0 and 1 included), layouts, index dtypes and dtypes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import reference, sampled_weight_grad, sparse_delta_linear
from tests.fuzz.common import (
    FEATURES_MIN,
    FUZZ,
    absolute,
    assert_close_to_float64,
    compare_all,
    dtypes,
    forward_backward,
    layouts,
    numel,
    seeds,
    tensor,
)


def sorted_indices(out_f: int, in_f: int, density: float, int32: bool, seed: int) -> torch.Tensor:
    k = int(density * out_f * in_f)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values
    return idx.to(torch.int32 if int32 else torch.int64)


@FUZZ
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=2),
    in_f=st.integers(FEATURES_MIN, 24),
    out_f=st.integers(FEATURES_MIN, 24),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    dtype=dtypes,
    bias=st.booleans(),
    int32=st.booleans(),
    x_layout=layouts,
    w_layout=layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_sparse_delta_linear(lead, in_f, out_f, density, dtype, bias, int32, x_layout, w_layout, dy_layout, seed):
    idx = sorted_indices(out_f, in_f, density, int32, seed)
    x = tensor((*lead, in_f), dtype, x_layout, seed)
    w = tensor((out_f, in_f), dtype, w_layout, seed + 1, max(in_f, 1) ** -0.5)
    b = tensor((out_f,), dtype, "contiguous", seed + 2) if bias else None
    delta = tensor((idx.numel(),), dtype, "step_last", seed + 3, 0.1)
    dy = tensor((*lead, out_f), dtype, dy_layout, seed + 4)
    args = [x, w, b, delta, idx]
    trainable = [True, False, bias, True, False]

    ours = forward_backward(sparse_delta_linear, args, trainable, dy)
    lowp = forward_backward(reference.sparse_delta_linear, args, trainable, dy)
    ref64 = forward_backward(
        reference.sparse_delta_linear, args, trainable, dy, lambda t: t if t is idx else t.double()
    )
    mags = forward_backward(
        reference.sparse_delta_linear, args, trainable, dy, lambda t: t if t is idx else absolute(t)
    )
    names = ["y", "dx"] + (["db"] if bias else []) + ["ddelta"]
    compare_all(names, ours, lowp, ref64, mags, terms=numel(lead) + in_f + out_f)


@FUZZ
@given(
    lead=st.lists(st.integers(0, 40), min_size=1, max_size=2),
    in_f=st.integers(FEATURES_MIN, 30),
    out_f=st.integers(FEATURES_MIN, 30),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    dtype=dtypes,
    int32=st.booleans(),
    x_layout=layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_sampled_weight_grad(lead, in_f, out_f, density, dtype, int32, x_layout, dy_layout, seed):
    idx = sorted_indices(out_f, in_f, density, int32, seed)
    dy = tensor((*lead, out_f), dtype, dy_layout, seed)
    x = tensor((*lead, in_f), dtype, x_layout, seed + 1)
    ours = sampled_weight_grad(dy, x, idx, in_f)
    lowp = reference.sampled_weight_grad(dy, x, idx, in_f)
    ref64 = reference.sampled_weight_grad(dy.double(), x.double(), idx, in_f)
    mag = reference.sampled_weight_grad(absolute(dy), absolute(x), idx, in_f)
    assert_close_to_float64("grad", ours, lowp, ref64, mag, terms=numel(lead))
