"""Fuzz: the GGUF block-quantized linear (Q4_0, Q4_1, Q8_0) against its float64 dequantize-then-matmul
reference, forward and backward, any token shapes (0 and 1 included), layouts and dtypes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import gguf_linear, reference
from pyfastpeft.ops.gguf import Q4_0, Q4_1, Q8_0, block_bytes
from tests.fuzz.common import FUZZ, absolute, compare_all, dtypes, forward_backward, layouts, numel, seeds, tensor

lead_shapes = st.lists(st.integers(0, 40), min_size=1, max_size=1) | st.lists(st.integers(0, 5), min_size=2, max_size=3)


def random_blocks(rows: int, cols: int, qtype: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    nb, bb = cols // 32, block_bytes(qtype)
    if rows * nb == 0:
        return torch.empty(rows, nb * bb, dtype=torch.uint8)
    raw = torch.randint(0, 256, (rows, nb, bb), generator=g, dtype=torch.uint8)
    raw[..., 0:2] = (torch.randn(rows, nb, 1, generator=g) * 0.05).half().view(torch.uint8)
    if qtype == Q4_1:
        raw[..., 2:4] = (torch.randn(rows, nb, 1, generator=g) * 0.05).half().view(torch.uint8)
    return raw.reshape(rows, nb * bb)


def reference_lowp(x, blocks, qtype, cols, bias):
    """Plain PyTorch in x's dtype over the weight dequantized to that dtype (the float32 weight first)."""
    w = reference.gguf_dequantize(blocks, qtype, cols, torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@FUZZ
@given(
    lead=lead_shapes,
    rows=st.integers(0, 40),
    blocks_per_row=st.integers(0, 5),
    qtype=st.sampled_from([Q4_0, Q4_1, Q8_0]),
    dtype=dtypes,
    train_x=st.booleans(),
    with_bias=st.booleans(),
    x_layout=layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_gguf_linear(lead, rows, blocks_per_row, qtype, dtype, train_x, with_bias, x_layout, dy_layout, seed):
    cols = 32 * blocks_per_row
    blocks = random_blocks(rows, cols, qtype, seed)
    x = tensor((*lead, cols), dtype, x_layout, seed + 1)
    b = tensor((rows,), dtype, "contiguous", seed + 2) if with_bias else None
    dy = tensor((*lead, rows), dtype, dy_layout, seed + 3)

    def ours_fn(x, bias):
        return gguf_linear(x, blocks, qtype, cols, bias)

    def lowp_fn(x, bias):
        return reference_lowp(x, blocks, qtype, cols, bias)

    def ref_fn(x, bias):
        return reference.gguf_linear(x, blocks, qtype, cols, bias)

    args, trainable = [x, b], [train_x, with_bias]
    ours = forward_backward(ours_fn, args, trainable, dy)
    lowp = forward_backward(lowp_fn, args, trainable, dy)
    ref64 = forward_backward(ref_fn, args, trainable, dy, lambda t: t.double())

    def mag_fn(x, bias):
        w = reference.gguf_dequantize(blocks, qtype, cols).abs()
        return torch.nn.functional.linear(x, w, bias)

    mags = forward_backward(mag_fn, args, trainable, dy, absolute)
    names = ["y"] + (["dx"] if train_x else []) + (["db"] if with_bias else [])
    # + 1: the Q4_1 weight rounded once to float32 in every dtype but float64
    compare_all(names, ours, lowp, ref64, mags, terms=numel(lead) + cols + rows + 1)
