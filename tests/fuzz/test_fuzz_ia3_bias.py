"""Fuzz: (IA)³ scaling and the BitFit linear against their float64 references, forward and backward,
any shapes (0 and 1 included), layouts and dtypes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import bias_only_linear, ia3_scale, reference
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

# up to 300 rows: past the CPU backwards' row slabs (64 for IA3, 128 for BitFit), with a partial last one
lead_shapes = st.lists(st.integers(0, 300), min_size=1, max_size=1) | st.lists(
    st.integers(0, 9), min_size=2, max_size=3
)


@FUZZ
@given(
    lead=lead_shapes,
    d=st.integers(FEATURES_MIN, 70),
    dtype=dtypes,
    train_x=st.booleans(),
    train_scale=st.booleans(),
    x_layout=layouts,
    scale_layout=param_layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_ia3_scale(lead, d, dtype, train_x, train_scale, x_layout, scale_layout, dy_layout, seed):
    x = tensor((*lead, d), dtype, x_layout, seed)
    scale = tensor((d,), dtype, scale_layout, seed + 1)
    dy = tensor((*lead, d), dtype, dy_layout, seed + 2)
    trainable = [train_x, train_scale]
    ours = forward_backward(ia3_scale, [x, scale], trainable, dy)
    lowp = forward_backward(reference.ia3_scale, [x, scale], trainable, dy)
    ref64 = forward_backward(reference.ia3_scale, [x, scale], trainable, dy, lambda t: t.double())
    mags = forward_backward(reference.ia3_scale, [x, scale], trainable, dy, absolute)
    names = ["y"] + (["dx"] if train_x else []) + (["dscale"] if train_scale else [])
    compare_all(names, ours, lowp, ref64, mags, terms=numel(lead))


@FUZZ
@given(
    lead=lead_shapes,
    in_f=st.integers(FEATURES_MIN, 40),
    out_f=st.integers(FEATURES_MIN, 40),
    dtype=dtypes,
    train_x=st.booleans(),
    x_layout=layouts,
    w_layout=layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_bias_only_linear(lead, in_f, out_f, dtype, train_x, x_layout, w_layout, dy_layout, seed):
    x = tensor((*lead, in_f), dtype, x_layout, seed)
    w = tensor((out_f, in_f), dtype, w_layout, seed + 1, max(in_f, 1) ** -0.5)
    b = tensor((out_f,), dtype, "step_last", seed + 2)
    dy = tensor((*lead, out_f), dtype, dy_layout, seed + 3)
    args, trainable = [x, w, b], [train_x, False, True]
    ours = forward_backward(bias_only_linear, args, trainable, dy)
    lowp = forward_backward(reference.bias_only_linear, args, trainable, dy)
    ref64 = forward_backward(reference.bias_only_linear, args, trainable, dy, lambda t: t.double())
    mags = forward_backward(reference.bias_only_linear, args, trainable, dy, absolute)
    names = ["y"] + (["dx"] if train_x else []) + ["db"]
    compare_all(names, ours, lowp, ref64, mags, terms=numel(lead) + in_f + out_f)
