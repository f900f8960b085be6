"""pyfastpeft.ops.lora_linear against Hugging Face PEFT's formula computed in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft
from pyfastpeft.ops import reference
from tests.conftest import DEVICES, FLOAT_DTYPES, low_precision_error_bound, requires_cuda


def make_inputs(lead, in_f, out_f, r, dtype, device, bias=True, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(*lead, 2 * in_f) if noncontig else rand(*lead, in_f)
    tensors = {
        "x": x,
        "weight": rand(out_f, in_f) / in_f**0.5,
        "bias": rand(out_f) if bias else None,
        "lora_A": rand(r, in_f) / in_f**0.5,
        "lora_B": rand(out_f, r) / r**0.5,
    }
    out = {}
    for k, v in tensors.items():
        if v is None:
            out[k] = None
            continue
        t = v.to(device=device, dtype=dtype)
        if k == "x" and noncontig:  # every other column: x[..., in] with last stride 2
            t = t[..., ::2]
            assert in_f == 1 or t.numel() == 0 or not t.is_contiguous()
        out[k] = t.detach().requires_grad_(k != "weight")
    return out


def run(fn, inputs, grad_out_seed=1, absolute=False):
    """Forward and every gradient of fn(**inputs), with a fixed random upstream gradient (its absolute
    value with ``absolute``)."""
    y = fn(**inputs)
    g = torch.Generator().manual_seed(grad_out_seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    if absolute:
        dy = dy.abs()
    leaves = [v for v in inputs.values() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach()] + [gr.detach() for gr in grads]


def clone_as(inputs, dtype, device="cpu"):
    return {
        k: None if v is None else v.detach().to(device=device, dtype=dtype).requires_grad_(v.requires_grad)
        for k, v in inputs.items()
    }


def check_against_reference(inputs, scaling, dtype, mask=None, p=0.0, seed=None, factor=3.0):
    ours = run(lambda **kw: pyfastpeft.ops.lora_linear(**kw, scaling=scaling, dropout_p=p, seed=seed), inputs)
    cpu_mask64 = None if mask is None else mask.cpu().double()
    ref64 = run(
        lambda **kw: reference.lora_linear(**kw, scaling=scaling, dropout_mask=cpu_mask64, dropout_p=p),
        clone_as(inputs, torch.float64),
    )
    lowp_mask, lowp_p = (None if mask is None else mask.to(dtype)), p
    if mask is not None and dtype in (torch.float32, torch.float64):
        # the op multiplies by 1/(1-p) rounded to the dtype it computes in: so does the plain version whose
        # error sets the bound (dividing by 1-p instead is another valid rounding, one ulp off per term,
        # which a cancelling sum of a few terms turns into more than the bound's floor)
        lowp_mask, lowp_p = mask.to(dtype) * (1.0 / (1.0 - p)), 0.0
    lowp = run(
        lambda **kw: reference.lora_linear(**kw, scaling=scaling, dropout_mask=lowp_mask, dropout_p=lowp_p),
        clone_as(inputs, dtype, inputs["x"].device),
    )
    # the same sums of products on absolute values: rounding is relative to these when results cancel
    magnitude = run(
        lambda **kw: reference.lora_linear(**kw, scaling=abs(scaling), dropout_mask=cpu_mask64, dropout_p=p),
        {k: None if v is None else v.abs() for k, v in clone_as(inputs, torch.float64).items()},
        absolute=True,
    )
    names = ["y"] + [k for k, v in inputs.items() if v is not None and v.requires_grad]
    for name, o, r64, lp, mag in zip(names, ours, ref64, lowp, magnitude, strict=True):
        assert o.shape == r64.shape, name
        assert o.dtype == dtype, name
        err, bound = low_precision_error_bound(o.cpu(), lp.cpu(), r64, factor, magnitude=mag)
        assert err <= bound, f"{name}: error {err:.3e} exceeds {bound:.3e} ({dtype})"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("r", [1, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, r, bias):
    inputs = make_inputs((3, 11), 37, 29, r, dtype, device, bias=bias)
    check_against_reference(inputs, scaling=1.7, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_input(device, dtype):
    inputs = make_inputs((2, 5, 9), 24, 13, 4, dtype, device, noncontig=True)
    check_against_reference(inputs, scaling=0.5, dtype=dtype)


# (600, 70) spans several row blocks (which start inside a Philox group) and several dA parts.
@pytest.mark.parametrize("p, lead, in_f", [(0.3, (4, 7), 33), (0.05, (4, 7), 33), (0.2, (600,), 70)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dropout_equals_reference_with_the_same_mask(device, dtype, p, lead, in_f):
    seed = 1234
    inputs = make_inputs(lead, in_f, 21, 8, dtype, device)
    ones = torch.ones(inputs["x"].shape, dtype=dtype, device=device)
    mask = (pyfastpeft.ops.philox_dropout(ones, p, seed=seed) != 0).to(dtype)
    assert 0 < mask.sum() < mask.numel()
    check_against_reference(inputs, scaling=2.0, dtype=dtype, mask=mask, p=p, seed=seed)


# Every tile of the float32 kernels of the rank-r products (lora_rank_simd.h), at both vector widths:
# ranks padded to a vector and to two (r = 1 .. 21 and 64), rank tiles of 8 or 6, 4 and 1 (r = 5, 13, 21);
# row tiles of 12 or 6, 2 and 1 (N = 301, and 299 in two parts); whole and partial strips of 48 or 16
# columns (outer) and of 64 or 16 (wide), and strips past the last column (out = 19, in = 47, 70); the outer
# product's sweeps of 32 rows and a shorter last one (parts of 149 to 151 rows end in one); r = 16
# as the real model has it, 64 the largest on those kernels and 65 on the BLAS; the dropout kernels' row
# blocks at every level, and the same shapes without dropout.
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("r, n_rows", [(1, 301), (5, 299), (13, 301), (16, 299), (21, 301), (64, 299), (65, 301)])
@pytest.mark.parametrize("in_f", [47, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_and_width_tails(dtype, in_f, r, n_rows, p):
    seed = 99
    inputs = make_inputs((n_rows,), in_f, 19, r, dtype, "cpu", seed=r)
    mask = None
    if p > 0:
        ones = torch.ones(inputs["x"].shape, dtype=dtype)
        mask = (pyfastpeft.ops.philox_dropout(ones, p, seed=seed) != 0).to(dtype)
    check_against_reference(inputs, scaling=1.5, dtype=dtype, mask=mask, p=p, seed=seed if p else None)


# Rows enough for several parts of the CPU kernels' one parallel region (a power of two of them, about
# 256 rows each): each part writes its rows of xa and of y = b + s·xa·Bᵀ, and dA and dB are sums over
# the parts; with and without dropout, with and without a bias.
@pytest.mark.parametrize("n_rows", [600, 1100])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_several_row_parts(dtype, bias, p, n_rows):
    seed = 31
    inputs = make_inputs((n_rows,), 45, 23, 6, dtype, "cpu", bias=bias, seed=n_rows)
    mask = None
    if p > 0:
        ones = torch.ones(inputs["x"].shape, dtype=dtype)
        mask = (pyfastpeft.ops.philox_dropout(ones, p, seed=seed) != 0).to(dtype)
    check_against_reference(inputs, scaling=0.7, dtype=dtype, mask=mask, p=p, seed=seed if p else None)


# The CPU forward keeps its dropout mask as bits (element e: bit e % 8 of byte e / 8, then 8 zero bytes):
# they are the Philox stream's mask, set from several threads' parts whose boundaries fall inside a byte
# (300 rows x 45 features), and a backward from them equals one that draws the mask again.
@pytest.mark.parametrize("lead, in_f", [((600,), 45), ((3, 7), 33), ((1,), 5), ((1100,), 128)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kept_mask_bits(dtype, lead, in_f):
    p, seed = 0.3, 17
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(lead, in_f, 11, 4, dtype, "cpu").items()}
    rng = torch.tensor([seed, 0], dtype=torch.int64)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], 0.9, p, rng)
    y, xa, keep = torch.ops.pyfastpeft.lora_linear(*args)
    numel = inputs["x"].numel()
    assert keep.dtype == torch.uint8 and keep.shape == ((numel + 7) // 8 + 8,)
    bits = torch.from_numpy(np.unpackbits(keep.numpy(), bitorder="little"))
    assert torch.equal(bits[:numel].bool(), reference.philox_keep_mask(numel, p, seed))
    assert not bits[numel:].any()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    grads = [dy, inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], xa, 0.9, p, rng]
    mask = [True, False, False, True, True]
    from_bits = torch.ops.pyfastpeft.lora_linear_backward(*grads, keep, mask)
    redrawn = torch.ops.pyfastpeft.lora_linear_backward(*grads, None, mask)
    for a, b in zip(from_bits, redrawn, strict=True):
        assert torch.equal(a, b)


# The CPU kernels split rows into parts (a function of the row count alone) and a part's rows into chunks
# (of the layer's widths alone); dA and dB are summed part by part in a fixed order: the forward and every
# gradient are the same bit for bit however many threads run them (1100 rows: four parts of three chunks).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    inputs = make_inputs((1100,), 200, 300, 16, dtype, "cpu", seed=8)
    fn = lambda **kw: pyfastpeft.ops.lora_linear(**kw, scaling=2.0, dropout_p=0.1, seed=4)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(fn, inputs))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_bad_kept_mask_bits():
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs((4,), 8, 6, 2, torch.float32, "cpu").items()}
    rng = torch.tensor([1, 0], dtype=torch.int64)
    y, xa, keep = torch.ops.pyfastpeft.lora_linear(
        inputs["x"], inputs["weight"], None, inputs["lora_A"], inputs["lora_B"], 1.0, 0.5, rng
    )
    grads = [torch.ones_like(y), inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], xa, 1.0, 0.5, rng]
    for bad, match in [
        (keep[:-1], r"keep: expected the forward's mask bits, a contiguous \[12\]"),
        (keep.float(), "keep: expected dtype Byte"),
    ]:
        with pytest.raises(ValueError, match=match):
            torch.ops.pyfastpeft.lora_linear_backward(*grads, bad, [True] * 5)


# A layer wide enough that the dropout kernels' block buffers (64 rows x 4200) and the partial sums of
# dA (8 parts x r x in) pass the 1 MiB a thread keeps between calls: those are allocated per call.
def test_dropout_buffers_of_a_wide_layer():
    seed = 5
    inputs = make_inputs((2048,), 4200, 5, 8, torch.float32, "cpu", seed=seed)
    ones = torch.ones(inputs["x"].shape)
    mask = (pyfastpeft.ops.philox_dropout(ones, 0.1, seed=seed) != 0).float()
    check_against_reference(inputs, scaling=2.0, dtype=torch.float32, mask=mask, p=0.1, seed=seed)


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    in_f=st.integers(1, 40),
    out_f=st.integers(1, 40),  # a zero-size feature dimension is refused today
    r=st.integers(1, 12),
    dtype=st.sampled_from(FLOAT_DTYPES),
    bias=st.booleans(),
    noncontig=st.booleans(),
    p=st.sampled_from([0.0, 0.25]),
    seed=st.integers(0, 2**31),
)
def test_property_matches_reference(lead, in_f, out_f, r, dtype, bias, noncontig, p, seed):
    for device in DEVICES:
        inputs = make_inputs(tuple(lead), in_f, out_f, r, dtype, device, bias=bias, noncontig=noncontig, seed=seed)
        mask = None
        if p > 0:
            ones = torch.ones(inputs["x"].shape, dtype=dtype, device=device)
            mask = (pyfastpeft.ops.philox_dropout(ones, p, seed=seed) != 0).to(dtype)
        check_against_reference(inputs, scaling=1.3, dtype=dtype, mask=mask, p=p, seed=seed if p else None)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.4])
def test_gradcheck(p):
    inputs = make_inputs((2, 3), 6, 5, 2, torch.float64, "cpu")
    weight = inputs["weight"].detach().requires_grad_(True)  # dW path too

    def f(x, w, b, a, bb):
        return pyfastpeft.ops.lora_linear(x, w, b, a, bb, scaling=0.7, dropout_p=p, seed=5)

    args = (inputs["x"], weight, inputs["bias"], inputs["lora_A"], inputs["lora_B"])
    assert torch.autograd.gradcheck(f, args)


def test_only_requested_gradients_are_computed():
    inputs = make_inputs((4,), 8, 6, 2, torch.float64, "cpu")
    inputs["x"].requires_grad_(False)
    y = pyfastpeft.ops.lora_linear(**inputs, scaling=1.0)
    y.sum().backward()
    assert inputs["x"].grad is None and inputs["weight"].grad is None
    assert inputs["lora_A"].grad is not None and inputs["lora_B"].grad is not None


def test_opcheck(device):
    inputs = make_inputs((3, 5), 12, 7, 3, torch.float32, device)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=device)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], 0.5, 0.2, rng)
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear, args)
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear, args[:6] + (0.0, None))
    y, xa, keep = torch.ops.pyfastpeft.lora_linear(*args)
    bwd_args = (
        torch.randn_like(y),
        inputs["x"].detach(),
        inputs["weight"].detach(),
        inputs["lora_A"].detach(),
        inputs["lora_B"].detach(),
        xa,
        0.5,
        0.2,
        rng,
        keep,
        [True, False, True, True, True],
    )
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear_backward, bwd_args)
    only_b = bwd_args[:-1] + ([False, False, False, False, True],)  # four empty gradients, none aliased
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear_backward, only_b)
    redrawn = bwd_args[:9] + (None, bwd_args[-1])  # no bits: the backward draws the mask again
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear_backward, redrawn)


class TestDropout:
    def test_same_seed_same_output_and_fresh_seed_differs(self, device):
        inputs = make_inputs((16, 4), 32, 8, 4, torch.float32, device)
        f = lambda seed: pyfastpeft.ops.lora_linear(**inputs, scaling=1.0, dropout_p=0.5, seed=seed)  # noqa: E731
        assert torch.equal(f(3), f(3))
        assert not torch.equal(f(3), f(4))
        torch.manual_seed(0)
        a = f(None)
        torch.manual_seed(0)
        assert torch.equal(a, f(None))

    @requires_cuda
    def test_cpu_and_cuda_agree(self):
        inputs = make_inputs((9, 5), 40, 24, 8, torch.float32, "cpu")
        ours_cpu = run(lambda **kw: pyfastpeft.ops.lora_linear(**kw, scaling=1.0, dropout_p=0.3, seed=8), inputs)
        ours_gpu = run(
            lambda **kw: pyfastpeft.ops.lora_linear(**kw, scaling=1.0, dropout_p=0.3, seed=8),
            clone_as(inputs, torch.float32, "cuda"),
        )
        for a, b in zip(ours_cpu, ours_gpu, strict=True):
            torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-4)


class TestBadInput:
    def setup_method(self):
        self.inputs = make_inputs((4,), 8, 6, 2, torch.float32, "cpu")

    def call(self, **override):
        kw = {**self.inputs, **override}
        scaling = kw.pop("scaling", 1.0)
        p = kw.pop("dropout_p", 0.0)
        return pyfastpeft.ops.lora_linear(**kw, scaling=scaling, dropout_p=p)

    @pytest.mark.parametrize(
        "override, match",
        [
            ({"x": torch.randn(4, 9)}, r"x: expected size 8 in dimension 1"),
            ({"lora_A": torch.randn(2, 9)}, r"lora_A: expected size 8 in dimension 1"),
            ({"lora_B": torch.randn(7, 2)}, r"lora_B: expected size 6 in dimension 0"),
            ({"lora_B": torch.randn(6, 3)}, r"lora_B: expected size 2 in dimension 1 \(the rank r"),
            ({"bias": torch.randn(5)}, r"bias: expected size 6"),
            ({"weight": torch.randn(8)}, r"weight: expected a 2-D tensor"),
            ({"lora_A": torch.randn(2, 8, dtype=torch.float64)}, r"lora_A: expected dtype Float"),
            ({"x": torch.randint(0, 3, (4, 8))}, r"x: expected a float64, float32, bfloat16 or float16"),
            ({"dropout_p": 1.0}, r"dropout_p: expected a probability in \[0, 1\)"),
            ({"dropout_p": -0.1}, r"dropout_p: expected a probability in \[0, 1\)"),
        ],
    )
    def test_clear_errors(self, override, match):
        with pytest.raises(ValueError, match=match):
            self.call(**override)

    def test_missing_rng_state(self):
        x = self.inputs
        with pytest.raises(ValueError, match="rng_state: required when dropout_p > 0"):
            torch.ops.pyfastpeft.lora_linear(x["x"], x["weight"], x["bias"], x["lora_A"], x["lora_B"], 1.0, 0.5, None)

    def test_bad_seed(self):
        with pytest.raises(ValueError, match="seed: expected an int"):
            pyfastpeft.ops.lora_linear(**self.inputs, dropout_p=0.1, seed=1.5)

    @requires_cuda
    def test_device_mismatch(self):
        with pytest.raises(ValueError, match=r"lora_A: expected device cuda"):
            self.call(
                x=self.inputs["x"].cuda(),
                weight=self.inputs["weight"].cuda(),
                bias=None,
                lora_B=self.inputs["lora_B"].cuda(),
            )
