"""GGUFLinear and GGUFEmbedding: the modules over the gguf ops, a tied head, and their buffers."""

from __future__ import annotations

import pytest
import torch

import pyfastpeft  # noqa: F401
from pyfastpeft.nn import GGUFEmbedding, GGUFLinear
from pyfastpeft.ops import gguf_linear, reference
from pyfastpeft.ops.gguf import Q4_0, Q4_1, Q8_0, block_bytes
from tests.ops.test_gguf import random_blocks


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
def test_linear_module(qtype):
    blocks = random_blocks(10, 64, qtype)
    bias = torch.randn(10)
    layer = GGUFLinear(blocks, qtype, 64, 10, bias)
    assert (layer.in_features, layer.out_features, layer.qtype) == (64, 10, qtype)
    assert layer.blocks is blocks and "blocks" in dict(layer.named_buffers())
    assert [n for n, p in layer.named_parameters()] == ["bias"]
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, gguf_linear(x, blocks, qtype, 64, layer.bias))
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.bias.grad.shape == (10,)
    assert torch.equal(layer.dequantized_weight(torch.float64), reference.gguf_dequantize(blocks, qtype, 64))
    # bfloat16 activations: the float32 bias is cast to x's dtype
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16
    assert "Q4" in repr(layer) or "Q8" in repr(layer)


def test_from_float_round_trips_through_quantize():
    w = torch.randn(6, 96)
    layer = GGUFLinear.from_float(w, Q8_0)
    assert layer.blocks.shape == (6, 3 * block_bytes(Q8_0))
    assert (layer.dequantized_weight() - w).abs().max() <= w.abs().max() / 127


@pytest.mark.parametrize("qtype", [Q4_1, Q8_0])
def test_embedding_and_tied_head_share_one_buffer(qtype):
    blocks = random_blocks(40, 96, qtype, seed=3)
    emb = GGUFEmbedding(blocks, qtype, 40, 96)
    head = GGUFLinear.tied_to(emb)
    assert head.blocks is emb.blocks and head.blocks.data_ptr() == emb.blocks.data_ptr()
    ids = torch.tensor([[1, 39, 1]])
    h = emb(ids)
    w = reference.gguf_dequantize(blocks, qtype, 96, torch.float32)
    assert h.dtype == torch.float32 and torch.equal(h, w[ids])
    logits = head(h)
    assert logits.shape == (1, 3, 40)
    assert (head.out_features, head.in_features) == (40, 96)
    # module.to(dtype) leaves the uint8 bytes alone
    assert emb.to(torch.float16).blocks.dtype == torch.uint8


def test_bad_construction():
    blocks = random_blocks(4, 64, Q4_0)
    with pytest.raises(ValueError, match=r"blocks: expected shape \(4, 40\)"):
        GGUFLinear(blocks, Q4_1, 64, 4)
    with pytest.raises(ValueError, match="in_features: expected a multiple of 32"):
        GGUFLinear(blocks, Q4_0, 60, 4)
    with pytest.raises(ValueError, match="blocks: expected a uint8 tensor"):
        GGUFEmbedding(torch.zeros(4, 36), Q4_0, 4, 64)
    with pytest.raises(ValueError, match="qtype: expected a GGML block type"):
        GGUFEmbedding(blocks, 7, 4, 64)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        GGUFLinear(blocks, Q4_0, 64, 4, torch.zeros(5))
