"""Linear layers and embeddings on GGUF (ggml) block-quantized weights, without a float copy.

A weight ``[rows, cols]`` (``cols % 32 == 0``) is a uint8 tensor ``[rows, cols // 32 * block_bytes(qtype)]``
holding the GGUF file's tensor bytes as they are (csrc/ops/gguf/gguf.h has the formats):

========  ====  ===========  ==========================================
qtype     id    block bytes  weight of code q
========  ====  ===========  ==========================================
``Q4_0``  2     18           ``d · (q - 8)``, q a nibble
``Q4_1``  3     20           ``d · q + m``, q a nibble
``Q8_0``  8     34           ``d · q``, q an int8
========  ====  ===========  ==========================================

The kernels decode one block at a time into registers or a small per-thread buffer: the whole float
weight never exists. The weight is frozen: :func:`gguf_linear` is differentiable with respect to ``x``
and ``bias`` only, and its backward (``dx = dy · dequant(W)``, its own fused op) needs only the blocks,
so the rule saves nothing of ``x`` and nothing weight-sized in float.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft

Q4_0, Q4_1, Q8_0 = 2, 3, 8
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
BLOCK_SIZE = 32


def block_bytes(qtype: int) -> int:
    """Bytes of one block of 32 weights of ``qtype`` (2: Q4_0, 3: Q4_1, 8: Q8_0)."""
    _check_qtype(qtype)
    return _BLOCK_BYTES[int(qtype)]


def _check_qtype(qtype: int) -> None:
    if int(qtype) not in _BLOCK_BYTES:
        raise ValueError(f"qtype: expected a GGML block type 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got {qtype}")


def _check_blocks(blocks: torch.Tensor, qtype: int, cols: int) -> None:
    """The fake kernels' copy of gguf_impl.h's checks (the real kernels make the same ones)."""
    _check_qtype(qtype)
    if cols < 0 or cols % BLOCK_SIZE:
        raise ValueError(f"cols: expected a non-negative multiple of 32 (the weights per block), got {cols}")
    if blocks.dtype != torch.uint8:
        raise ValueError(f"blocks: expected a uint8 tensor of GGUF block bytes, got {blocks.dtype}")
    if blocks.dim() != 2:
        raise ValueError(f"blocks: expected a 2-D tensor, got {blocks.dim()}-D with shape {tuple(blocks.shape)}")
    nbytes = cols // BLOCK_SIZE * _BLOCK_BYTES[int(qtype)]
    if blocks.shape[1] != nbytes:
        raise ValueError(
            f"blocks: expected {nbytes} bytes per row ({cols // BLOCK_SIZE} blocks of {_BLOCK_BYTES[int(qtype)]} "
            f"bytes: {_NAMES[int(qtype)]} with cols={cols}), got shape {tuple(blocks.shape)}"
        )


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: expected a float64, float32, bfloat16 or float16 tensor, got {t.dtype}")


@torch.library.register_fake("pyfastpeft::gguf_linear")
def _gguf_linear_fake(x, blocks, qtype, cols, bias):
    _check_blocks(blocks, qtype, cols)
    _check_float(x, "x")
    check_same_device("x", x, blocks=blocks, bias=bias)
    if x.dim() < 1 or x.shape[-1] != cols:
        raise ValueError(f"x: expected size {cols} in its last dimension (cols), got shape {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], blocks.shape[0]))


@torch.library.register_fake("pyfastpeft::gguf_linear_backward")
def _gguf_linear_backward_fake(grad_y, blocks, qtype, cols):
    _check_blocks(blocks, qtype, cols)
    check_same_device("grad_y", grad_y, blocks=blocks)
    return grad_y.new_empty((*grad_y.shape[:-1], cols))


@torch.library.register_fake("pyfastpeft::gguf_dequantize")
def _gguf_dequantize_fake(blocks, qtype, cols, dtype):
    _check_blocks(blocks, qtype, cols)
    return blocks.new_empty((blocks.shape[0], cols), dtype=dtype)


@torch.library.register_fake("pyfastpeft::gguf_embedding")
def _gguf_embedding_fake(ids, blocks, qtype, cols, dtype):
    _check_blocks(blocks, qtype, cols)
    check_same_device("ids", ids, blocks=blocks)
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids: expected an int64 or int32 tensor of row indices, got {ids.dtype}")
    return blocks.new_empty((*ids.shape, cols), dtype=dtype)


@torch.library.register_fake("pyfastpeft::gguf_quantize")
def _gguf_quantize_fake(weight, qtype):
    _check_qtype(qtype)
    _check_float(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] % BLOCK_SIZE:
        raise ValueError(
            "weight: expected a 2-D tensor whose number of columns is a multiple of 32, "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.new_empty(
        (weight.shape[0], weight.shape[1] // BLOCK_SIZE * _BLOCK_BYTES[int(qtype)]), dtype=torch.uint8
    )


def _setup_context(ctx, inputs, output):
    _, blocks, qtype, cols, bias = inputs
    ctx.save_for_backward(blocks)  # the uint8 blocks only: never x, never a float weight
    ctx.qtype, ctx.cols = qtype, cols
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    need = ctx.needs_input_grad
    (blocks,) = ctx.saved_tensors
    dx = _OP.gguf_linear_backward(grad_y, blocks, ctx.qtype, ctx.cols) if need[0] else None
    db = None
    if ctx.has_bias and need[4]:
        db = grad_y.reshape(math.prod(grad_y.shape[:-1]), grad_y.shape[-1]).sum(0)
    return dx, None, None, None, db


torch.library.register_autograd("pyfastpeft::gguf_linear", _backward, setup_context=_setup_context)


def gguf_linear(
    x: torch.Tensor, blocks: torch.Tensor, qtype: int, cols: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x · dequant(W)ᵀ + bias`` over the blocks of W, never materialising the float weight.

    Args:
        x: ``[..., cols]`` float64, float32, bfloat16 or float16 input, any strides.
        blocks: uint8 ``[rows, cols // 32 * block_bytes(qtype)]``: the GGUF tensor's bytes.
        qtype: 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0).
        cols: the weight's input width (a multiple of 32).
        bias: optional ``[rows]`` bias with x's dtype.

    Returns ``[..., rows]`` in x's dtype. Differentiable with respect to ``x`` and ``bias``; the weight is frozen.
    """
    return _OP.gguf_linear(x, blocks, int(qtype), int(cols), bias)


def gguf_dequantize(blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[rows, cols]`` of ``blocks`` (for export and checks; the layers never call it).

    float32 values equal ggml's (and the ``gguf`` package's) dequantization exactly; float64 ones are exact.
    """
    return _OP.gguf_dequantize(blocks, int(qtype), int(cols), dtype)


def gguf_embedding(
    ids: torch.Tensor, blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rows ``ids`` of the weight, ``[..., cols]``: only the looked-up rows are dequantized. No gradient."""
    return _OP.gguf_embedding(ids, blocks, int(qtype), int(cols), dtype)


def gguf_quantize(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """Round-to-nearest GGUF blocks of a float weight ``[rows, cols]``, as ggml's ``quantize_row_*_ref``.

    The values are rounded to float32 first (ggml quantizes float32 rows); the result equals the ``gguf``
    package's ``quants.quantize`` byte for byte.
    """
    return _OP.gguf_quantize(weight, int(qtype))
