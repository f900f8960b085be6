"""GGUF block-quantized linear, backward, dequantize, embedding and quantize ops against float64
references and the gguf package's numpy implementation of the formats."""

from __future__ import annotations

import gguf
import pytest
import torch

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import gguf_dequantize, gguf_embedding, gguf_linear, gguf_quantize, reference
from pyfastpeft.ops.gguf import Q4_0, Q4_1, Q8_0, block_bytes
from tests.conftest import FLOAT_DTYPES, assert_within_rounding

_OP = torch.ops.pyfastpeft
QTYPES = [Q4_0, Q4_1, Q8_0]
GGML = {
    Q4_0: gguf.GGMLQuantizationType.Q4_0,
    Q4_1: gguf.GGMLQuantizationType.Q4_1,
    Q8_0: gguf.GGMLQuantizationType.Q8_0,
}


def random_blocks(rows: int, cols: int, qtype: int, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    """Blocks with random codes and random finite fp16 scales (both signs) and minimums."""
    g = torch.Generator().manual_seed(seed)
    nb, bb = cols // 32, block_bytes(qtype)
    if rows * nb == 0:
        return torch.empty(rows, nb * bb, dtype=torch.uint8)
    raw = torch.randint(0, 256, (rows, nb, bb), generator=g, dtype=torch.uint8)
    raw[..., 0:2] = (torch.randn(rows, nb, 1, generator=g) * scale).half().view(torch.uint8)
    if qtype == Q4_1:
        raw[..., 2:4] = (torch.randn(rows, nb, 1, generator=g) * scale).half().view(torch.uint8)
    return raw.reshape(rows, nb * bb)


def randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def run(fn, x, blocks, qtype, cols, bias, grad_y):
    """Output and (dx, db) of fn for the given upstream gradient."""
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    y = fn(x, blocks, qtype, cols, bias)
    dx, db = torch.autograd.grad(y, (x, bias), grad_y)
    return y, dx, db


def check_against_reference(x, blocks, qtype, cols, bias, gy):
    """y, dx and db within the rounding of their sums of the float64 dequantize-then-matmul reference.

    The kernels use the float32 weights (rounded once for Q4_1: one more unit per product) for every
    dtype but float64, which decodes exactly."""
    ours = run(gguf_linear, x, blocks, qtype, cols, bias, gy)
    as64 = [t.double() for t in (x, bias, gy)]
    ref = run(reference.gguf_linear, as64[0], blocks, qtype, cols, as64[1], as64[2])
    w_abs = reference.gguf_dequantize(blocks, qtype, cols).abs()
    mags = (
        as64[0].abs() @ w_abs.t() + as64[1].abs(),
        as64[2].abs() @ w_abs,
        as64[2].abs().reshape(-1, blocks.shape[0]).sum(0),
    )
    weight_rounding = 1 if qtype == Q4_1 and x.dtype != torch.float64 else 0
    tokens = gy.numel() // blocks.shape[0]
    terms = [cols + 1 + weight_rounding, blocks.shape[0] + weight_rounding, tokens]
    for name, o, r, m, n in zip(["y", "dx", "db"], ours, ref, mags, terms, strict=True):
        assert o.dtype == x.dtype
        assert_within_rounding(name, o, r, m, terms=n)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("cols", [32, 96])
def test_linear_forward_backward_float64(qtype, rows, tokens, cols):
    blocks = random_blocks(rows, cols, qtype, seed=rows * 100 + cols)
    x, b, gy = randn(tokens, cols, seed=1), randn(rows, seed=2), randn(tokens, rows, seed=3)
    check_against_reference(x, blocks, qtype, cols, b, gy)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_every_dtype_batched_non_contiguous(qtype, dtype):
    rows, cols = 37, 160  # a partial panel of weight rows and a partial tile of rows and tokens
    blocks = random_blocks(rows, cols, qtype, seed=5)
    x = randn(3, 22, cols + 9, dtype=dtype, seed=1)[:, ::2, 4 : 4 + cols]  # [3, 11, cols], strided
    gy = randn(3, 11, 2 * rows, dtype=dtype, seed=2)[..., ::2]
    assert not x.is_contiguous() and not gy.is_contiguous()
    check_against_reference(x, blocks, qtype, cols, randn(rows, seed=3).to(dtype), gy)


@pytest.mark.parametrize("qtype", QTYPES)
def test_linear_large_float32(qtype):
    # several row panels per thread, 300 tokens (100 full token tiles), rows past one backward chunk
    rows, cols = 300, 576
    blocks = random_blocks(rows, cols, qtype, seed=9)
    check_against_reference(
        randn(300, cols, dtype=torch.float32, seed=1),
        blocks,
        qtype,
        cols,
        randn(rows, dtype=torch.float32, seed=2),
        randn(300, rows, dtype=torch.float32, seed=3),
    )


@pytest.mark.parametrize("qtype", QTYPES)
def test_linear_without_bias_and_size_zero(qtype):
    blocks = random_blocks(5, 64, qtype)
    x = randn(2, 4, 64, dtype=torch.float32, seed=1)
    y = gguf_linear(x, blocks, qtype, 64)
    ref = reference.gguf_linear(x.double(), blocks, qtype, 64)
    mag = x.double().abs() @ reference.gguf_dequantize(blocks, qtype, 64).abs().t()
    assert_within_rounding("y", y, ref, mag, terms=66)
    # zero rows of weight, zero columns, zero tokens
    assert gguf_linear(x, blocks[:0], qtype, 64).shape == (2, 4, 0)
    empty = torch.empty(3, 0, dtype=torch.uint8)
    x0 = torch.zeros(6, 0, requires_grad=True)
    y0 = gguf_linear(x0, empty, qtype, 0)
    assert torch.equal(y0, torch.zeros(6, 3))
    y0.sum().backward()
    assert x0.grad.shape == (6, 0)


@pytest.mark.parametrize("qtype", QTYPES)
def test_gradcheck_float64(qtype):
    blocks = random_blocks(5, 64, qtype, seed=3, scale=0.5)
    x = randn(2, 3, 64, seed=1).requires_grad_(True)
    b = randn(5, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, b: gguf_linear(x, blocks, qtype, 64, b), (x, b))


def saved_tensor_sizes(x, blocks, qtype, cols, bias) -> list[int]:
    sizes = []

    def pack(t):
        sizes.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gguf_linear(x, blocks, qtype, cols, bias).sum().backward()
    return sizes


def test_saves_only_the_blocks():
    blocks = random_blocks(12, 64, Q4_1)
    x = randn(4, 33, 64, dtype=torch.float32).requires_grad_(True)
    b = randn(12, dtype=torch.float32, seed=1).requires_grad_(True)
    assert saved_tensor_sizes(x, blocks, Q4_1, 64, b) == [(torch.uint8, blocks.numel())]


@pytest.mark.parametrize("qtype", QTYPES)
def test_results_do_not_depend_on_the_thread_count(qtype):
    # large enough that 2 threads split both kernels (tasks of at least 2^22 multiply-adds)
    blocks = random_blocks(300, 576, qtype)
    x, gy = randn(100, 576, dtype=torch.float32), randn(100, 300, dtype=torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((gguf_linear(x, blocks, qtype, 576), _OP.gguf_linear_backward(gy, blocks, qtype, 576)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [0, 1, 3, 33])
def test_dequantize_equals_gguf_package(qtype, rows):
    cols = 96
    blocks = random_blocks(rows, cols, qtype, seed=rows)
    ours = gguf_dequantize(blocks, qtype, cols)
    if rows == 0:  # the gguf package cannot reshape an empty array
        theirs = torch.empty(0, cols)
    else:
        theirs = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), GGML[qtype]).reshape(rows, cols))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols) and torch.equal(ours, theirs)
    assert torch.equal(
        gguf_dequantize(blocks, qtype, cols, torch.float64), reference.gguf_dequantize(blocks, qtype, cols)
    )
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(gguf_dequantize(blocks, qtype, cols, dtype), theirs.to(dtype))


def test_dequantize_known_block():
    # Q4_0, d = 0.5: byte j holds codes (j, 15 - j): weight j = 0.5·(j - 8), weight j + 16 = 0.5·(7 - j)
    block = torch.empty(1, 18, dtype=torch.uint8)
    block[0, :2] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)
    block[0, 2:] = torch.tensor([j | ((15 - j) << 4) for j in range(16)], dtype=torch.uint8)
    expected = [0.5 * (j - 8) for j in range(16)] + [0.5 * (7 - j) for j in range(16)]
    assert gguf_dequantize(block, Q4_0, 32).tolist() == [expected]


def quantize_inputs(rows: int, cols: int, seed: int) -> torch.Tensor:
    w = randn(rows, cols, dtype=torch.float32, seed=seed) * 0.1
    if rows >= 4:
        w[0, :32] = 0  # an all-zero block: d = 0
        w[1, :32] = 0.25  # a constant block (Q4_1: max == min)
        w[2, :32] = torch.arange(32, dtype=torch.float32) - 15.5  # codes at exact halves (ties)
        w[3, :32] = torch.tensor([-1.0, 1.0] * 16)  # equal magnitudes: the first one is Q4_0's max
    return w


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 32), (5, 96), (64, 256)])
def test_quantize_bit_exact_with_gguf_package(qtype, rows, cols):
    w = quantize_inputs(rows, cols, seed=rows + cols)
    ours = gguf_quantize(w, qtype)
    theirs = torch.from_numpy(gguf.quants.quantize(w.numpy(), GGML[qtype]))
    assert ours.shape == theirs.shape == (rows, cols // 32 * block_bytes(qtype))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_quantize_other_dtypes_round_to_float32_first(qtype, dtype):
    w = quantize_inputs(6, 64, seed=1).to(dtype)
    theirs = torch.from_numpy(gguf.quants.quantize(w.float().numpy(), GGML[qtype]))
    assert torch.equal(gguf_quantize(w, qtype), theirs)
    assert gguf_quantize(w[:0], qtype).shape == (0, 2 * block_bytes(qtype))


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_round_trip_error(qtype):
    # the round trip is within half a step of each block's grid (Q4_0's grid ends at one step short of -max)
    w = quantize_inputs(8, 128, seed=4)
    back = gguf_dequantize(gguf_quantize(w, qtype), qtype, 128).double()
    blocks = w.double().reshape(8, 4, 32)
    if qtype == Q8_0:
        step = blocks.abs().amax(-1, keepdim=True) / 127
    elif qtype == Q4_1:
        step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    else:
        step = blocks.abs().amax(-1, keepdim=True) / 8
    err = (back.reshape(8, 4, 32) - blocks).abs()
    # half a step, plus the fp16 rounding of d (and m) carried through the codes; Q4_0's grid runs from
    # max (code 0) to -7/8·max (code 15), so a value near -max is clipped: up to one whole step
    half = 1.0 if qtype == Q4_0 else 0.5
    assert (err <= step * (half + 16 * 2**-11) + 2**-11 * blocks.abs().amax(-1, keepdim=True) + 1e-12).all()
    if qtype == Q4_0:
        assert (err > step * 0.6).any()  # the clipped end is reached (w[3] holds ±1)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_embedding(qtype, dtype):
    blocks = random_blocks(50, 96, qtype, seed=7)
    ids = torch.tensor([[3, 0, 49], [3, 7, 1]])[:, ::2]  # non-contiguous, repeated rows
    out = gguf_embedding(ids, blocks, qtype, 96, dtype)
    full = gguf_dequantize(blocks, qtype, 96, torch.float32).to(dtype)
    assert out.dtype == dtype and out.shape == (2, 2, 96)
    if dtype == torch.float64:
        full = reference.gguf_dequantize(blocks, qtype, 96)
    assert torch.equal(out, full[ids])
    assert torch.equal(gguf_embedding(ids.int(), blocks, qtype, 96, dtype), out)  # int32 ids too
    assert gguf_embedding(torch.empty(0, 4, dtype=torch.int64), blocks, qtype, 96).shape == (0, 4, 96)
    assert gguf_embedding(torch.tensor(5), blocks, qtype, 96).shape == (96,)


@pytest.mark.parametrize("qtype", QTYPES)
def test_opcheck(qtype):
    blocks = random_blocks(7, 64, qtype)
    x = randn(2, 5, 64, dtype=torch.float32).requires_grad_(True)
    b = randn(7, dtype=torch.float32, seed=1).requires_grad_(True)
    torch.library.opcheck(_OP.gguf_linear.default, (x, blocks, qtype, 64, b))
    torch.library.opcheck(_OP.gguf_linear.default, (x, blocks, qtype, 64, None))
    torch.library.opcheck(_OP.gguf_linear_backward.default, (randn(2, 5, 7, dtype=torch.float32), blocks, qtype, 64))
    torch.library.opcheck(_OP.gguf_dequantize.default, (blocks, qtype, 64, torch.float32))
    torch.library.opcheck(
        _OP.gguf_embedding.default, (torch.tensor([[1, 6], [0, 0]]), blocks, qtype, 64, torch.float32)
    )
    torch.library.opcheck(_OP.gguf_quantize.default, (randn(3, 64, dtype=torch.float32), qtype))


@pytest.mark.parametrize("qtype", QTYPES)
def test_torch_compile_fullgraph(qtype):
    blocks = random_blocks(6, 64, qtype)
    x, b = randn(4, 9, 64, dtype=torch.float32), randn(6, dtype=torch.float32, seed=1)
    ids = torch.tensor([[0, 5, 2]])

    def loss(x, b):
        return gguf_linear(x, blocks, qtype, 64, b).square().sum() + gguf_embedding(ids, blocks, qtype, 64).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xs, bs = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    xe, be = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    lc, le = compiled(xs, bs), loss(xe, be)
    lc.backward()
    le.backward()
    assert torch.equal(lc, le) and torch.equal(xs.grad, xe.grad) and torch.equal(bs.grad, be.grad)


def test_bad_inputs():
    blocks, x = random_blocks(4, 64, Q8_0), randn(3, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"qtype: expected a GGML block type 2 \(Q4_0\)"):
        gguf_linear(x, blocks, 1, 64)
    with pytest.raises(ValueError, match="cols: expected a non-negative multiple of 32"):
        gguf_linear(randn(3, 33, dtype=torch.float32), blocks, Q8_0, 33)
    with pytest.raises(ValueError, match=r"blocks: expected 68 bytes per row \(2 blocks of 34 bytes: Q8_0"):
        gguf_linear(x, blocks[:, :-1], Q8_0, 64)
    with pytest.raises(ValueError, match="blocks: expected 36 bytes per row"):
        gguf_linear(x, blocks, Q4_0, 64)  # Q8_0 bytes read as Q4_0
    with pytest.raises(ValueError, match="blocks: expected a uint8 tensor"):
        gguf_linear(x, blocks.view(torch.int8), Q8_0, 64)
    with pytest.raises(ValueError, match="blocks: expected a 2-D tensor"):
        gguf_dequantize(blocks.flatten(), Q8_0, 64)
    with pytest.raises(ValueError, match="x: expected size 64"):
        gguf_linear(randn(3, 32, dtype=torch.float32), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match="x: expected a float64"):
        gguf_linear(x.long(), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match="bias: expected size 4"):
        gguf_linear(x, blocks, Q8_0, 64, randn(5, dtype=torch.float32))
    with pytest.raises(ValueError, match="bias: expected dtype"):
        gguf_linear(x, blocks, Q8_0, 64, randn(4))
    with pytest.raises(ValueError, match=r"^blocks: expected device cpu \(the device of x\), got meta"):
        gguf_linear(x, blocks.to("meta"), Q8_0, 64)
    with pytest.raises(ValueError, match=r"^blocks: expected device meta \(the device of x\), got cpu"):
        gguf_linear(x.to("meta"), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match=r"^blocks: expected device meta \(the device of ids\), got cpu"):
        gguf_embedding(torch.zeros(2, dtype=torch.int64, device="meta"), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match="grad_y: expected size 4"):
        _OP.gguf_linear_backward(randn(3, 5, dtype=torch.float32), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match=r"ids: expected indices in \[0, 4\)"):
        gguf_embedding(torch.tensor([0, 4]), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match=r"ids: expected indices in \[0, 4\)"):
        gguf_embedding(torch.tensor([-1]), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match="ids: expected an int64 or int32 tensor"):
        gguf_embedding(torch.tensor([0], dtype=torch.int16), blocks, Q8_0, 64)
    with pytest.raises(ValueError, match="dtype: expected float64"):
        gguf_dequantize(blocks, Q8_0, 64, torch.int32)
    with pytest.raises(ValueError, match="weight: expected a number of columns that is a multiple of 32"):
        gguf_quantize(randn(2, 40, dtype=torch.float32), Q8_0)
    with pytest.raises(ValueError, match="weight: expected a float64"):
        gguf_quantize(torch.zeros(2, 32, dtype=torch.int32), Q8_0)
    with pytest.raises(ValueError, match="qtype: expected a GGML block type"):
        block_bytes(0)


def test_meta_shapes():
    blocks = torch.empty(7, 5 * 20, dtype=torch.uint8, device="meta")
    x = torch.empty(2, 3, 160, device="meta", dtype=torch.bfloat16)
    assert gguf_linear(x, blocks, Q4_1, 160).shape == (2, 3, 7)
    assert gguf_dequantize(blocks, Q4_1, 160, torch.float16).dtype == torch.float16
