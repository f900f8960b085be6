"""pyfastpeft.ops.multi_lora_linear against running every adapter separately, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft
from pyfastpeft.ops import BASE_ADAPTER, adapter_indices_from_names, kernel_layout, reference
from tests.conftest import FLOAT_DTYPES, assert_within_rounding, low_precision_error_bound

OP = torch.ops.pyfastpeft.multi_lora_linear.default
OP_BACKWARD = torch.ops.pyfastpeft.multi_lora_linear_backward.default


def make_case(n_rows=37, in_f=29, out_f=19, r=3, K=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n_rows, in_f, generator=g, dtype=torch.float64),
        "weight": torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5,
        "bias": torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None,
        "lora_A": torch.randn(K, r, in_f, generator=g, dtype=torch.float64) / in_f**0.5,
        "lora_B": torch.randn(K, out_f, r, generator=g, dtype=torch.float64) / r**0.5,
        "scalings": torch.rand(K, generator=g, dtype=torch.float64) + 0.5,
    }


def make_indices(layout: str, n_rows: int, K: int, seed: int = 0) -> torch.Tensor:
    """'random': every token its own adapter (the sorted path); 'runs': one adapter per sequence of
    RUN tokens, long enough for the in-place path, with adapter 0 in two separate runs. Both leave
    adapter 1 without tokens and include tokens with -1."""
    if layout == "random":
        g = torch.Generator().manual_seed(seed)
        choices = torch.tensor([-1, 0, *range(2, K)])
        return choices[torch.randint(0, len(choices), (n_rows,), generator=g)]
    n_sequences = -(-n_rows // RUN)
    per_sequence = torch.tensor([0, K - 1 if K > 2 else -1, -1, 0]).repeat(n_sequences)[:n_sequences]
    return per_sequence.repeat_interleave(RUN)[:n_rows]


RUN = 40  # tokens per sequence in the 'runs' layout (the CPU op works in place from 32 on average)


def forward_backward(fn, case, idx, dtype, device, grad_of=("x", "lora_A", "lora_B"), x_view=None, absolute=False):
    """Output and gradients of fn on the case; ``absolute``: on |inputs| with |grad_y|, which gives each
    result's sum of absolute terms (the scale of its rounding)."""
    if absolute:
        case = {k: None if v is None else v.abs() for k, v in case.items()}
    t = {
        k: None if v is None else v.to(device=device, dtype=dtype, copy=True)
        for k, v in case.items()
        if k != "scalings"
    }
    for name in grad_of:
        t[name].requires_grad_(True)
    x = t["x"] if x_view is None else x_view(t["x"])
    y = fn(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], case["scalings"].to(device), idx.to(device))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward((grad_y.abs() if absolute else grad_y).to(device=device, dtype=dtype))
    # A reference that never touches an adapter leaves its .grad None: that is a zero gradient.
    return [y.detach()] + [torch.zeros_like(t[n]) if t[n].grad is None else t[n].grad for n in grad_of]


def ours(x, weight, bias, lora_A, lora_B, scalings, idx):
    return pyfastpeft.ops.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, idx)


def assert_float64_within_rounding(got, ref, case, idx, device, grad_of=("x", "lora_A", "lora_B"), **kwargs):
    """float64 results against the float64 reference, elementwise within the roundings of any summation
    order: each result chains at most rows + in + out + r operations (the longest: dA, a sum over rows of
    products that each sum over out and r), each off by one unit of each element's sum of absolute terms.
    ``kwargs`` go to forward_backward (the same function and view the reference ran with)."""
    n_rows, in_f = case["x"].shape
    out_f, r = case["lora_B"].shape[1:]
    fn = kwargs.pop("fn", reference.multi_lora_linear)
    magnitude = forward_backward(fn, case, idx, torch.float64, "cpu", grad_of=grad_of, absolute=True, **kwargs)
    names = ["y", *(f"d{n}" for n in grad_of)]
    for name, g, want, m in zip(names, got, ref, magnitude, strict=True):
        assert_within_rounding(name, g.cpu(), want, m, terms=n_rows + in_f + out_f + r)


def assert_matches_float64(got, case, idx, dtype, device, factor=2.0):
    """Output and gradients within ``factor`` times plain PyTorch's error in the same dtype (each adapter
    run separately) against float64, plus two roundings of each result's sum of absolute terms."""
    ref64 = forward_backward(reference.multi_lora_linear, case, idx, torch.float64, "cpu")
    lowp = forward_backward(reference.multi_lora_linear, case, idx, dtype, device)
    magnitude = forward_backward(reference.multi_lora_linear, case, idx, torch.float64, "cpu", absolute=True)
    for name, g, t, r, m in zip(["y", "dx", "dA", "dB"], got, lowp, ref64, magnitude, strict=True):
        assert g.shape == r.shape and g.dtype == dtype, name
        err, bound = low_precision_error_bound(g.cpu(), t.cpu(), r, factor, magnitude=m)
        assert err <= bound, f"{name}: error {err} > bound {bound}"


@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_equals_each_adapter_run_separately(device, dtype, layout, bias):
    case = make_case(n_rows=130, bias=bias)
    idx = make_indices(layout, 130, 5)
    got = forward_backward(ours, case, idx, dtype, device)
    assert_matches_float64(got, case, idx, dtype, device)


@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [16, 21])
def test_every_kernel_block_shape(device, dtype, layout, r):
    """Sizes that reach every register block of the CPU forward kernels: 8-row blocks and single-row
    tails, one and two packs of ranks with a padded last pack (r = 21), whole and partial packs of
    outputs and a scalar tail (out = 83), inputs not a multiple of a pack (in = 70), and adapters
    with more tokens than one 64-row block."""
    case = make_case(n_rows=211, in_f=70, out_f=83, r=r, K=4, seed=3)
    idx = make_indices(layout, 211, 4)
    got = forward_backward(ours, case, idx, dtype, device)
    assert_matches_float64(got, case, idx, dtype, device)


def stored_transposed(t: torch.Tensor) -> torch.Tensor:
    """The same [K, a, b] values held as a contiguous [K, b, a] (the layouts the CPU kernels read in place)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [8, 16, 21])
@pytest.mark.parametrize("which", ["A", "B", "both"])
def test_transposed_storage_of_the_adapters(device, dtype, layout, r, which):
    """A stored as Aᵀ and B as Bᵀ (what the LoRA layer's inference stack holds) give what the
    contiguous stack gives, outputs and gradients, whether or not the op can read them in place
    (r = 8 is one whole pack of float64 ranks but half a pack of float32 ones; r = 21 neither)."""
    case = make_case(n_rows=211, in_f=70, out_f=83, r=r, K=4, seed=5)
    idx = make_indices(layout, 211, 4)

    def with_layout(x, weight, bias, lora_A, lora_B, scalings, idx):
        A = stored_transposed(lora_A) if which in ("A", "both") else lora_A
        B = stored_transposed(lora_B) if which in ("B", "both") else lora_B
        assert A.shape == lora_A.shape and B.shape == lora_B.shape
        return ours(x, weight, bias, A, B, scalings, idx)

    got = forward_backward(with_layout, case, idx, dtype, device)
    assert_matches_float64(got, case, idx, dtype, device)
    with torch.no_grad():  # and bit for bit what the contiguous stack gives in the forward
        t = {k: v.to(device=device, dtype=dtype) for k, v in case.items() if v is not None and k != "scalings"}
        plain = ours(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case["scalings"].to(device), idx)
        laid = with_layout(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case["scalings"].to(device), idx)
    torch.testing.assert_close(laid, plain, rtol=0, atol=0)


def test_adapter_without_tokens_gets_exact_zero_gradients(device):
    case = make_case()
    idx = make_indices("random", 37, 5)
    _, _, dA, dB = forward_backward(ours, case, idx, torch.float64, device)
    assert (dA[1] == 0).all() and (dB[1] == 0).all()
    assert dA[0].abs().sum() > 0 and dB[0].abs().sum() > 0


def test_all_tokens_without_adapter_is_the_base_linear(device):
    case = make_case()
    idx = torch.full((37,), -1)
    y, dx, dA, dB = forward_backward(ours, case, idx, torch.float64, device)
    x, w, b = (case[k].to(device) for k in ("x", "weight", "bias"))
    magnitude = torch.nn.functional.linear(x.abs(), w.abs(), b.abs())
    assert_within_rounding("y", y, torch.nn.functional.linear(x, w, b), magnitude, terms=x.shape[1] + 1)
    assert (dA == 0).all() and (dB == 0).all()


def test_weight_and_bias_gradients_when_requested(device):
    case = make_case(n_rows=130)
    idx = make_indices("runs", 130, 5)
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    got = forward_backward(ours, case, idx, torch.float64, device, grad_of=names)
    ref = forward_backward(reference.multi_lora_linear, case, idx, torch.float64, "cpu", grad_of=names)
    assert_float64_within_rounding(got, ref, case, idx, device, grad_of=names)


@pytest.mark.parametrize("layout", ["random", "runs"])
def test_non_contiguous_x_3d_x_and_int32_indices(device, layout):
    case = make_case(n_rows=6 * 7)
    idx = make_indices(layout, 42, 5).to(torch.int32)

    def as_3d_transposed(x):  # [6, 7, in] viewed as [7, 6, in]: not contiguous
        return x.reshape(6, 7, -1).transpose(0, 1)

    def shaped_indices(fn):
        def run(x, *args):
            *rest, i = args
            return fn(x, *rest, i.reshape(6, 7).t())

        return run

    got = forward_backward(shaped_indices(ours), case, idx, torch.float64, device, x_view=as_3d_transposed)
    ref = forward_backward(
        shaped_indices(reference.multi_lora_linear), case, idx, torch.float64, "cpu", x_view=as_3d_transposed
    )
    assert got[0].shape == (7, 6, 19)
    fn = shaped_indices(reference.multi_lora_linear)
    assert_float64_within_rounding(got, ref, case, idx, device, fn=fn, x_view=as_3d_transposed)


@pytest.mark.parametrize("layout", ["random", "runs"])
def test_zero_padded_smaller_rank_equals_that_rank(device, layout):
    case = make_case(n_rows=130, r=4, K=2)
    case["lora_A"][1, 2:] = 0  # adapter 1 has rank 2, padded to 4
    case["lora_B"][1, :, 2:] = 0
    if layout == "runs":
        idx = torch.tensor([1] * 40 + [0] * 40 + [1] * 50)
    else:
        idx = torch.randint(-1, 2, (130,), generator=torch.Generator().manual_seed(3))
    rows = (idx == 1).to(device)
    assert rows.any()
    y, _, dA, dB = forward_backward(ours, case, idx, torch.float64, device)
    small = dict(case, lora_A=case["lora_A"][1:, :2].clone(), lora_B=case["lora_B"][1:, :, :2].clone())
    small["scalings"] = case["scalings"][1:]
    y_small, _, dA_small, dB_small = forward_backward(ours, small, torch.where(idx == 1, 0, -1), torch.float64, device)
    # the padding adds exact zeros to each row's sums, which run in the same order whatever the other
    # rows hold: the same values bit for bit
    torch.testing.assert_close(y[rows], y_small[rows], rtol=0, atol=0)
    # Same tokens, same output gradient: the padded adapter's real block gets the rank-2 adapter's
    # gradients, and the padding gets exactly zero. The sums over tokens are grouped by the token layout,
    # which differs: both within the roundings of a sum over rows of products over out and r.
    small_idx = torch.where(idx == 1, 0, -1)
    _, _, mag_a, mag_b = forward_backward(
        reference.multi_lora_linear, small, small_idx, torch.float64, "cpu", absolute=True
    )
    terms = 130 + 19 + 2
    assert_within_rounding("dA", dA[1, :2].cpu(), dA_small[0].cpu(), mag_a[0], terms=terms, roundings=0)
    assert_within_rounding("dB", dB[1, :, :2].cpu(), dB_small[0].cpu(), mag_b[0], terms=terms, roundings=0)
    assert (dA[1, 2:] == 0).all() and (dB[1, :, 2:] == 0).all()


@pytest.mark.parametrize("layout", ["random", "runs"])
def test_dropout_uses_the_philox_mask_and_backward_regenerates_it(device, layout):
    case = make_case(n_rows=130)
    idx = make_indices(layout, 130, 5)
    p, seed = 0.3, 1234
    mask = pyfastpeft.ops.philox_dropout(torch.ones(130, 29, dtype=torch.float64, device=device), p, seed) * (1 - p)
    assert 0 < mask.sum() < mask.numel()

    def with_dropout(*args):
        return pyfastpeft.ops.multi_lora_linear(*args, dropout_p=p, seed=seed)

    def ref_with_mask(*args):
        return reference.multi_lora_linear(*args, dropout_mask=mask.cpu(), dropout_p=p)

    got = forward_backward(with_dropout, case, idx, torch.float64, device)
    ref = forward_backward(ref_with_mask, case, idx, torch.float64, "cpu")
    # the mask scales kept terms by 1/(1 − p): on absolute values the same reference gives their sums
    assert_float64_within_rounding(got, ref, case, idx, device, fn=ref_with_mask)


@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradcheck(device, layout, dropout_p):
    case = make_case(n_rows=130, in_f=6, out_f=5, r=2, K=3)
    idx = make_indices(layout, 130, 3).to(device)
    args = [case[k].to(device).requires_grad_() for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    s = case["scalings"].to(device)

    def fn(x, w, b, a, bb):
        return pyfastpeft.ops.multi_lora_linear(x, w, b, a, bb, s, idx, dropout_p=dropout_p, seed=5)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(device, layout, dropout_p):
    case = make_case(n_rows=21, in_f=6, out_f=5, r=2, K=3)
    idx = make_indices(layout, 21, 3).to(device)
    x, w, b, a, bb = (case[k].to(device) for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    s = case["scalings"].to(device)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=device) if dropout_p else None
    fwd_args = (x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), s, idx, dropout_p, rng)
    torch.library.opcheck(OP, fwd_args)
    _, xa = OP(*fwd_args)
    grad_y = torch.randn(21, 5, dtype=torch.float64, device=device)
    for mask in (
        [True, False, False, True, True],
        [True, True, True, True, True],
        [False, False, False, True, False],
    ):
        torch.library.opcheck(
            OP_BACKWARD, (grad_y, x.detach(), w, a.detach(), bb.detach(), s, idx, xa, dropout_p, rng, mask)
        )


def test_torch_compile_fullgraph(device):
    case = make_case()
    idx = make_indices("random", 37, 5)
    compiled = torch.compile(ours, fullgraph=True)
    got = forward_backward(compiled, case, idx, torch.float32, device)
    eager = forward_backward(ours, case, idx, torch.float32, device)
    for g, e in zip(got, eager, strict=True):  # the compiled graph calls the same op: bit-identical
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_index_out_of_range(device):
    case = make_case()
    idx = make_indices("random", 37, 5)
    idx[11] = 5
    if device == "cpu":
        with pytest.raises(ValueError, match=r"adapter_indices: index 5 at token 11 is out of range for 5 adapters"):
            forward_backward(ours, case, idx, torch.float64, device)
    else:  # CUDA: read as -1 (no adapter), never out of bounds
        got = forward_backward(ours, case, idx, torch.float64, device)
        ref = forward_backward(ours, case, torch.where(idx == 5, -1, idx), torch.float64, device)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter_indices: index -2 at token 3"):
        bad = idx.clone()
        bad[3] = -2
        pyfastpeft.ops.check_adapter_indices(bad.to(device), 5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(lora_B=c["lora_B"][:, :, :2]), "lora_B: expected size 3 in dimension 2"),
        (lambda c: c.update(lora_A=c["lora_A"][0]), "lora_A: expected a 3-D tensor"),
        (lambda c: c.update(lora_B=c["lora_B"][:4]), "lora_B: expected size 5 in dimension 0"),
        (
            lambda c: c.update(scalings=c["scalings"][:4]),
            r"scalings: expected a float32 or float64 tensor of shape \[5\]",
        ),
        (lambda c: c.update(idx=c["idx"][:36]), r"adapter_indices: expected one index per token"),
        (lambda c: c.update(idx=c["idx"].float()), "adapter_indices: expected an int64 or int32 tensor"),
        (lambda c: c.update(lora_A=c["lora_A"].float()), "lora_A: expected dtype Double"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(change, message):
    case = make_case()
    case["idx"] = make_indices("random", 37, 5)
    change(case)
    with pytest.raises(ValueError, match=message):
        pyfastpeft.ops.multi_lora_linear(
            case["x"],
            case["weight"],
            case["bias"],
            case["lora_A"],
            case["lora_B"],
            case["scalings"],
            case["idx"],
        )


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(0, 200),
    in_f=st.integers(1, 20),
    out_f=st.integers(1, 20),  # a zero-size feature dimension is refused today
    r=st.integers(1, 5),
    K=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["random", "runs"]),
)
def test_random_shapes_match_reference(n_rows, in_f, out_f, r, K, seed, layout):
    case = make_case(n_rows, in_f, out_f, r, K, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if layout == "random":
        idx = torch.randint(-1, K, (n_rows,), generator=g)
    else:
        n_sequences = -(-n_rows // RUN)
        idx = torch.randint(-1, K, (n_sequences,), generator=g).repeat_interleave(RUN)[:n_rows]
    got = forward_backward(ours, case, idx, torch.float64, "cpu")
    ref = forward_backward(reference.multi_lora_linear, case, idx, torch.float64, "cpu")
    magnitude = forward_backward(reference.multi_lora_linear, case, idx, torch.float64, "cpu", absolute=True)
    for name, a, b, m in zip(["y", "dx", "dA", "dB"], got, ref, magnitude, strict=True):
        assert a.shape == b.shape, name
        if a.numel():  # another summation order: within two roundings of the sum of |terms|
            err, bound = low_precision_error_bound(a, b, b, magnitude=m)
            assert err <= bound, (name, err, bound)


def test_indices_from_names_per_sequence_and_ragged():
    names = ["fr", "de", "es"]
    got = adapter_indices_from_names(["de", BASE_ADAPTER, "fr"], names, 2)
    assert got.tolist() == [1, 1, -1, -1, 0, 0]
    got = adapter_indices_from_names(["es", "fr"], names, [3, 1])
    assert got.tolist() == [2, 2, 2, 0] and got.dtype == torch.int64
    assert adapter_indices_from_names([], names, 3).tolist() == []
    with pytest.raises(ValueError, match="unknown adapter 'it'"):
        adapter_indices_from_names(["it"], names, 2)
    with pytest.raises(ValueError, match="tokens_per_sequence: expected 2 lengths"):
        adapter_indices_from_names(["es", "fr"], names, [3])
    with pytest.raises(ValueError, match="tokens_per_sequence: lengths must be non-negative"):
        adapter_indices_from_names(["es"], names, [-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("r", [8, 16, 21])
def test_kernel_layout_keeps_values_and_shapes(dtype, r):
    """The same values and shapes; on the CPU in float32/float64, Bᵀ stored contiguously, and Aᵀ too when r
    is a whole number of 64-byte packs."""
    a, b = torch.randn(3, r, 70).to(dtype), torch.randn(3, 83, r).to(dtype)
    la, lb = kernel_layout(a, b)
    assert torch.equal(la, a) and torch.equal(lb, b)
    if dtype == torch.bfloat16:
        assert la is a and lb is b
        return
    assert lb.transpose(1, 2).is_contiguous()
    assert la.transpose(1, 2).is_contiguous() == (r % (64 // a.element_size()) == 0)
