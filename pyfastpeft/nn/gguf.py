"""Modules over GGUF block-quantized weights: :class:`GGUFLinear` and :class:`GGUFEmbedding`.

Both keep the GGUF tensor's bytes as a uint8 buffer ``blocks`` (``[rows, cols // 32 * block_bytes]``,
see :mod:`pyfastpeft.ops.gguf`) and never hold a float copy of the weight; the kernels decode one block
at a time. The weight is frozen (a buffer, not a parameter); a linear layer's ``bias`` is an ordinary
parameter.

A tied output head (the token embedding reused as the LM head, as in SmolLM2) is a :class:`GGUFLinear`
over the *same* buffer tensor as the embedding: ``GGUFLinear.tied_to(embedding)``. Both modules then hold
one tensor (one copy of the bytes); ``state_dict`` lists it under both names, as it does for tied float
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import gguf as gguf_ops


def _checked_blocks(blocks: torch.Tensor, qtype: int, rows: int, cols: int, rows_name: str, cols_name: str):
    gguf_ops._check_qtype(qtype)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        got = blocks.dtype if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks: expected a uint8 tensor of GGUF block bytes, got {got}")
    if cols % gguf_ops.BLOCK_SIZE:
        raise ValueError(f"{cols_name}: expected a multiple of 32 (the weights per GGUF block), got {cols}")
    nbytes = cols // gguf_ops.BLOCK_SIZE * gguf_ops.block_bytes(qtype)
    if tuple(blocks.shape) != (rows, nbytes):
        raise ValueError(
            f"blocks: expected shape ({rows}, {nbytes}) ({rows_name}={rows}, {cols_name}={cols}, "
            f"{gguf_ops._NAMES[int(qtype)]}), got {tuple(blocks.shape)}"
        )
    return blocks


class GGUFLinear(nn.Module):
    """``y = x · dequant(W)ᵀ + b`` over a frozen GGUF weight ``[out_features, in_features]``.

    Args:
        blocks: uint8 ``[out_features, in_features // 32 * block_bytes(qtype)]``, kept as is (no copy).
        qtype: 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0).
        in_features, out_features: the weight's shape.
        bias: optional ``[out_features]`` float tensor, held as a parameter.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        qtype: int,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _checked_blocks(blocks, qtype, out_features, in_features, "out_features", "in_features")
        self.qtype = int(qtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.register_buffer("blocks", blocks)
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @classmethod
    def tied_to(cls, embedding: GGUFEmbedding, bias: torch.Tensor | None = None) -> GGUFLinear:
        """An output head ``x · Eᵀ`` sharing ``embedding``'s blocks tensor (no second copy)."""
        return cls(embedding.blocks, embedding.qtype, embedding.embedding_dim, embedding.num_embeddings, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None) -> GGUFLinear:
        """Quantizes a float weight ``[out, in]`` with ggml's round-to-nearest (for tests and export)."""
        blocks = gguf_ops.gguf_quantize(weight.detach(), qtype)
        return cls(blocks, qtype, weight.shape[1], weight.shape[0], bias)

    def packed_weights(self) -> tuple[torch.Tensor, int]:
        """(the blocks tensor, how many weights it holds): parameter counts include frozen packed weights,
        once per blocks tensor (a tied head shares its embedding's)."""
        return self.blocks, self.in_features * self.out_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` (a new tensor: for merging, export and checks)."""
        return gguf_ops.gguf_dequantize(self.blocks, self.qtype, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return gguf_ops.gguf_linear(x, self.blocks, self.qtype, self.in_features, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={gguf_ops._NAMES[self.qtype]}, bias={self.bias is not None}"
        )


class GGUFEmbedding(nn.Module):
    """Token embedding over a frozen GGUF weight ``[num_embeddings, embedding_dim]``.

    Only the looked-up rows are dequantized; the output is ``dtype`` (float32 by default). No gradient
    reaches the weight.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        qtype: int,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _checked_blocks(blocks, qtype, num_embeddings, embedding_dim, "num_embeddings", "embedding_dim")
        self.qtype = int(qtype)
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.dtype = dtype
        self.register_buffer("blocks", blocks)

    def packed_weights(self) -> tuple[torch.Tensor, int]:
        """(the blocks tensor, how many weights it holds); see GGUFLinear.packed_weights."""
        return self.blocks, self.num_embeddings * self.embedding_dim

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float table ``[num_embeddings, embedding_dim]`` (a new tensor)."""
        return gguf_ops.gguf_dequantize(self.blocks, self.qtype, self.embedding_dim, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return gguf_ops.gguf_embedding(ids, self.blocks, self.qtype, self.embedding_dim, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={gguf_ops._NAMES[self.qtype]}, dtype={self.dtype}"
