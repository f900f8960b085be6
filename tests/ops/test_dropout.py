"""pyfastpeft.ops.philox_dropout: the Philox mask against its specification (reference.philox_keep_mask),
the scaled output against a float64 product, autograd and the op's registration."""

from __future__ import annotations

import pytest
import torch

import pyfastpeft
from pyfastpeft.ops import reference
from tests.conftest import FLOAT_DTYPES, assert_within_rounding, requires_cuda


def _state(seed: int, device, offset: int = 0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, *FLOAT_DTYPES])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0, 5), (7, 33), (2, 3, 129)])
def test_output_is_x_times_mask_over_keep(device, dtype, shape):
    """out = x ⊙ mask / (1 - p), the product rounded once to the input's dtype."""
    p, seed = 0.3, 5
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = pyfastpeft.ops.philox_dropout(x.to(device), p, seed=seed).cpu()
    assert ours.dtype == dtype and ours.shape == x.shape
    mask = reference.philox_keep_mask(x.numel(), p, seed).view(shape)
    # the kernels multiply in float32 (float64 for float64) by the scale 1/(1-p) rounded to that type
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
    expected = (x.to(acc) * mask.to(acc) * scale).to(dtype)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_non_contiguous_input_is_masked_by_row_major_index(device):
    base = torch.randn(40, 18, device=device)
    x = base.t()[::2]  # [9, 40], strides (2, 18)
    assert not x.is_contiguous()
    ours = pyfastpeft.ops.philox_dropout(x, 0.4, seed=3)
    torch.testing.assert_close(ours, pyfastpeft.ops.philox_dropout(x.contiguous(), 0.4, seed=3), rtol=0, atol=0)
    assert ours.is_contiguous()


def test_backward_regenerates_the_mask(device):
    x = torch.randn(13, 29, dtype=torch.float64, device=device, requires_grad=True)
    y = pyfastpeft.ops.philox_dropout(x, 0.25, seed=17)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    mask = reference.philox_keep_mask(x.numel(), 0.25, 17).view(13, 29).to(device)
    # the same product as the forward: the incoming gradient times the mask times 1/(1 − p) rounded
    scale = torch.tensor(1.0 / 0.75, dtype=torch.float64, device=device)
    torch.testing.assert_close(gx, gy * mask.to(gy.dtype) * scale, rtol=0, atol=0)


def test_opcheck(device):
    x = torch.randn(37, 11, device=device)
    torch.library.opcheck(torch.ops.pyfastpeft.philox_dropout, (x, 0.3, _state(4, device)))
    torch.library.opcheck(torch.ops.pyfastpeft.philox_dropout, (x.requires_grad_(), 0.3, _state(4, device)))


class TestMask:
    def test_kept_fraction(self, device):
        x = torch.ones(1 << 20, device=device)
        for p in (0.05, 0.1, 0.5, 0.9):
            kept = (pyfastpeft.ops.philox_dropout(x, p, seed=3) != 0).double().mean().item()
            assert abs(kept - (1 - p)) < 4e-3, (p, kept)

    def test_scale_and_determinism(self, device):
        x = torch.randn(1000, 37, device=device)
        a = pyfastpeft.ops.philox_dropout(x, 0.2, seed=11)
        b = pyfastpeft.ops.philox_dropout(x, 0.2, seed=11)
        c = pyfastpeft.ops.philox_dropout(x, 0.2, seed=12)
        assert torch.equal(a, b) and not torch.equal(a, c)
        kept = a != 0
        scale = torch.tensor(1.0 / 0.8, dtype=torch.float32, device=device)  # 1/(1 − p) in float32
        torch.testing.assert_close(a[kept], x[kept] * scale, rtol=0, atol=0)

    @pytest.mark.parametrize("numel", [1, 127, 128, 1000, 4099])
    def test_mask_matches_the_philox_spec(self, device, numel):
        ones = torch.ones(numel, device=device)
        for p, seed in ((0.1, 0), (0.5, 2**40 + 7), (0.93, 123456789)):
            ours = pyfastpeft.ops.philox_dropout(ones, p, seed=seed).cpu() != 0
            assert torch.equal(ours, reference.philox_keep_mask(numel, p, seed)), (p, seed)

    @pytest.mark.parametrize("offset", [1, 2**32 + 5, 2**62 + 2**31 + 3])
    def test_mask_matches_the_philox_spec_at_any_offset(self, device, offset):
        """Both 32-bit halves of the offset and of the seed reach the counter and the key (the
        vectorised CPU generator splits them itself)."""
        ones = torch.ones(3 * 128 + 17, device=device)
        seed = 2**63 - 12345
        state = torch.tensor([seed, offset], dtype=torch.int64, device=device)
        ours = torch.ops.pyfastpeft.philox_dropout(ones, 0.3, state).cpu() != 0
        assert torch.equal(ours, reference.philox_keep_mask(ones.numel(), 0.3, seed, offset))

    def test_mask_depends_only_on_element_index(self):
        """The mask of element i is a function of (seed, offset, i): a prefix of a longer tensor
        gets the prefix of its mask (what makes CPU and CUDA agree, and backward reproduce forward)."""
        long = pyfastpeft.ops.philox_dropout(torch.ones(1003), 0.5, seed=9)
        short = pyfastpeft.ops.philox_dropout(torch.ones(77), 0.5, seed=9)
        assert torch.equal(long[:77], short)

    @requires_cuda
    def test_cpu_and_cuda_masks_agree(self):
        x = torch.randn(513, 71)
        cpu = pyfastpeft.ops.philox_dropout(x, 0.3, seed=21)
        gpu = pyfastpeft.ops.philox_dropout(x.cuda(), 0.3, seed=21).cpu()
        assert torch.equal(cpu != 0, gpu != 0)


# ---- dropout_linear: dropout(x) · Wᵀ whose backward regenerates the dropped input ----------------------


def _keep(shape, p: float, seed: int) -> torch.Tensor:
    """mask / (1 − p) in float64, by row-major element index (the op's mask)."""
    mask = reference.philox_keep_mask(int(torch.Size(shape).numel()), p, seed).view(shape)
    return mask.double() / (1.0 - p)


@pytest.mark.parametrize("dtype", [torch.float64, *FLOAT_DTYPES])
@pytest.mark.parametrize(
    "shape, out, view",
    [((0, 16), 3, False), ((1, 32), 1, False), ((3, 0, 16), 4, False), ((2, 7, 33), 5, False), ((2, 7, 33), 4, True)],
)
def test_dropout_linear_matches_float64_under_the_same_mask(device, dtype, shape, out, view):
    p, seed = 0.3, 23
    g = torch.Generator().manual_seed(sum(shape) + out)
    if view:  # a transposed view: the mask still follows the row-major index of the logical shape
        x = torch.randn(shape[1], shape[0], shape[2], generator=g).transpose(0, 1)
    else:
        x = torch.randn(shape, generator=g)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    w = torch.randn(out, shape[-1], generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    y = pyfastpeft.ops.dropout_linear(x, w, p, seed=seed)
    gy = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
    y.backward(gy)

    keep = _keep(shape, p, seed).to(device)
    x64, w64, g64 = x.detach().double(), w.detach().double(), gy.double()
    want = (x64 * keep) @ w64.T
    want_dx = (g64 @ w64) * keep
    want_dw = g64.reshape(-1, out).T @ (x64 * keep).reshape(-1, shape[-1])
    mag = (x64.abs() * keep) @ w64.abs().T
    mag_dx = (g64.abs() @ w64.abs()) * keep
    mag_dw = g64.abs().reshape(-1, out).T @ (x64.abs() * keep).reshape(-1, shape[-1])
    tokens = int(torch.Size(shape[:-1]).numel())
    # one rounding of the dropped input (or of grad·W), one of the product; the scale 1/(1 − p) is
    # rounded to the accumulation type
    assert_within_rounding("y", y, want, mag, terms=shape[-1] + 2, roundings=2)
    assert_within_rounding("dx", x.grad, want_dx, mag_dx, terms=out + 2, roundings=2)
    assert_within_rounding("dW", w.grad, want_dw, mag_dw, terms=tokens + 2, roundings=2)


def test_dropout_linear_equals_dropout_then_linear(device):
    """The same kernels as the unfused composition: the output and dx bit for bit."""
    x = torch.randn(5, 9, 64, device=device, requires_grad=True)
    w = torch.randn(6, 64, device=device, requires_grad=True)
    ours = pyfastpeft.ops.dropout_linear(x, w, 0.2, seed=4)
    x2 = x.detach().clone().requires_grad_(True)
    theirs = torch.nn.functional.linear(pyfastpeft.ops.philox_dropout(x2, 0.2, seed=4), w)
    assert torch.equal(ours, theirs)
    gy = torch.randn_like(ours)
    (dx,) = torch.autograd.grad(ours, x, gy)
    (dx2,) = torch.autograd.grad(theirs, x2, gy)
    assert torch.equal(dx, dx2)


def test_dropout_linear_saves_no_activation_sized_tensor_but_x(device):
    x = torch.randn(64, 48, device=device, requires_grad=True)
    w = torch.randn(4, 48, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pyfastpeft.ops.dropout_linear(x, w, 0.5, seed=1)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_dropout_linear_gradcheck_and_opcheck(device):
    x = torch.randn(3, 5, 32, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, 32, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: pyfastpeft.ops.dropout_linear(a, b, 0.4, seed=8), (x, w))
    state = _state(8, device)
    for args in ((x, w, 0.4, state), (x.detach(), w.detach(), 0.4, state), (x, w, 0.0, state)):
        torch.library.opcheck(torch.ops.pyfastpeft.dropout_linear, args)


def test_dropout_linear_compiles(device):
    x = torch.randn(4, 32, device=device, requires_grad=True)
    w = torch.randn(3, 32, device=device, requires_grad=True)
    compiled = torch.compile(lambda a, b: pyfastpeft.ops.dropout_linear(a, b, 0.25, seed=2), fullgraph=True)
    assert torch.equal(compiled(x, w), pyfastpeft.ops.dropout_linear(x, w, 0.25, seed=2))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 4), 0.1), "x: expected a floating-point tensor"),
        ((torch.zeros(2, 4), torch.zeros(3, 5), 0.1), r"weight: expected \[out, 4\]"),
        ((torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64), 0.1), "weight: expected x's dtype"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), 1.0), r"p: expected a drop probability in \[0, 1\)"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), -0.1), r"p: expected a drop probability in \[0, 1\)"),
    ],
)
def test_dropout_linear_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        pyfastpeft.ops.dropout_linear(*args)
