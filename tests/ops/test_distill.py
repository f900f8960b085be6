"""kd_loss and fused_linear_kd_loss against the float64 eager reference: loss and gradients, every
divergence and dtype, ignore_index, odd shapes, strides, gradcheck, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft as pf
from pyfastpeft.ops import reference
from tests.conftest import FLOAT_DTYPES, assert_within_rounding, low_precision_error_bound

DIVERGENCES = ["forward_kl", "reverse_kl", "js"]


def make_logits(n, v, device, dtype=torch.float64, spread=3.0, generator=None):
    s = torch.randn(n, v, dtype=torch.float64, generator=generator) * spread
    t = torch.randn(n, v, dtype=torch.float64, generator=generator) * spread
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_labels(n, v, device, ignore_every=4, ignore_index=-100, generator=None):
    labels = torch.randint(0, v, (n,), generator=generator)
    if ignore_every:
        labels[::ignore_every] = ignore_index
    return labels.to(device)


def loss_and_grad(fn, s, t, labels, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, labels, **kw)
    loss.backward()
    return loss.detach(), s.grad


# ---- float64 against the reference: every option ---------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_kd_loss_matches_reference_float64(device, divergence, temperature, alpha):
    s, t = make_logits(11, 1037, device)  # V not a multiple of the SIMD width or of the tile
    labels = make_labels(11, 1037, device)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence)
    loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, labels, **kw)
    ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s, t, labels, **kw)
    assert_kd_matches(loss, grad, ref_loss, ref_grad, s, t, labels, **kw)
    assert grad[::4].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_without_labels(device, divergence):
    s, t = make_logits(5, 300, device)
    loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, None, alpha=0.0, temperature=2.0, divergence=divergence)
    ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s, t, None, alpha=0.0, temperature=2.0, divergence=divergence)
    assert_kd_matches(loss, grad, ref_loss, ref_grad, s, t, None, alpha=0.0, temperature=2.0, divergence=divergence)


def test_custom_ignore_index_and_all_ignored(device):
    s, t = make_logits(6, 50, device)
    labels = make_labels(6, 50, device, ignore_every=2, ignore_index=7).clamp(min=8)
    labels[::2] = 7
    kw = dict(ignore_index=7, alpha=0.5)
    loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, labels, **kw)
    ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s, t, labels, **kw)
    assert_kd_matches(loss, grad, ref_loss, ref_grad, s, t, labels, **kw)

    all_ignored = torch.full((6,), -100, device=device)
    loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, all_ignored)
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (2, 3, 17), (4, 513), (2, 2, 2048 + 5)])
def test_odd_shapes(device, shape):
    s = torch.randn(shape, dtype=torch.float64, device=device)
    t = torch.randn(shape, dtype=torch.float64, device=device)
    labels = torch.randint(0, shape[-1], shape[:-1], device=device)
    for divergence in DIVERGENCES:
        kw = dict(temperature=1.5, alpha=0.3, divergence=divergence)
        loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, labels, **kw)
        ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s, t, labels, **kw)
        assert_kd_matches(loss, grad, ref_loss, ref_grad, s, t, labels, **kw)


def test_non_contiguous_views(device):
    big_s = torch.randn(9, 230, dtype=torch.float64, device=device)
    big_t = torch.randn(230, 9, dtype=torch.float64, device=device)
    s = big_s[:, 7:207]  # row stride 230
    t = big_t.t()[:, 3:203]  # column stride 9: copied to rows
    labels = torch.randint(0, 200, (18,), device=device)[::2]
    for divergence in DIVERGENCES:
        kw = dict(temperature=2.0, divergence=divergence)
        sv = s.detach().requires_grad_()
        loss = pf.ops.kd_loss(sv, t, labels, **kw)
        loss.backward()
        ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s.contiguous(), t.contiguous(), labels, **kw)
        assert_kd_matches(loss.detach(), sv.grad, ref_loss, ref_grad, s, t, labels, **kw)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 9),
    v=st.integers(1, 700),
    temperature=st.floats(0.3, 4.0),
    alpha=st.floats(0.0, 1.0),
    divergence=st.sampled_from(DIVERGENCES),
    spread=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_kd_loss_property(n, v, temperature, alpha, divergence, spread, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = make_logits(n, v, "cpu", spread=spread, generator=g)
    labels = make_labels(n, v, "cpu", ignore_every=3, generator=g)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence)
    loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, labels, **kw)
    ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s, t, labels, **kw)
    assert_kd_matches(loss, grad, ref_loss, ref_grad, s, t, labels, **kw)


# ---- low precision: error against float64 at most ~2x that of eager PyTorch in the same dtype ---------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_low_precision(device, dtype, divergence, temperature):
    g = torch.Generator().manual_seed(1)
    s, t = make_logits(16, 3001, device, dtype=dtype, generator=g)
    labels = make_labels(16, 3001, device, generator=g)
    kw = dict(temperature=temperature, alpha=0.5, divergence=divergence)
    loss, grad = loss_and_grad(pf.ops.kd_loss, s, t, labels, **kw)
    eager_loss, eager_grad = loss_and_grad(reference.kd_loss, s, t, labels, **kw)
    ref_loss, ref_grad = loss_and_grad(reference.kd_loss, s.double(), t.double(), labels, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype
    err, bound = low_precision_error_bound(loss, eager_loss, ref_loss)
    assert err <= bound, f"loss error {err:.3e} > {bound:.3e}"
    err, bound = low_precision_error_bound(grad, eager_grad, ref_grad, magnitude=grad_terms(s, t, labels, **kw))
    assert err <= bound, f"grad error {err:.3e} > {bound:.3e}"


def kd_terms(
    s, t, labels, temperature=1.0, alpha=0.5, divergence="forward_kl", ignore_index=-100, s_abs=None, t_abs=None
):
    """Upper bounds (float64) of the absolute terms behind the loss and each gradient element. Every
    divergence and its gradient is made of ps and pt times log-probabilities and the row's divergence
    (forward KL ps − pt, reverse KL ps·(ls − lt − D), JS with log m between ls and lt), plus the
    cross-entropy's log-sum-exp, its label's logit, ps and 1. A log-probability is a difference
    s/T − logsumexp, rounded at the size of both, so each counts with |s/T| + |logsumexp| as well. A
    valid summation order is off by roundings of these, not of the (possibly cancelling) result.
    ``s_abs``, ``t_abs``: the logits' own absolute terms when they are sums themselves (h·Wᵀ).
    Returns (loss terms [scalar], gradient terms [rows, vocab])."""
    vocab = s.shape[-1]
    s64, t64 = s.detach().double().reshape(-1, vocab), t.detach().double().reshape(-1, vocab)
    ls, lt = torch.log_softmax(s64 / temperature, -1), torch.log_softmax(t64 / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    lse = sum(torch.logsumexp(z / temperature, -1, keepdim=True).abs() for z in (s64, t64))
    s_abs = s64.abs() if s_abs is None else s_abs.double().reshape(-1, vocab)
    t_abs = t64.abs() if t_abs is None else t_abs.double().reshape(-1, vocab)
    # a masked (-inf) logit has probability 0 and adds no term
    logs = (ls.abs() + lt.abs() + (s_abs + t_abs) / temperature).nan_to_num(posinf=0.0) + lse + 1.0
    row = (ps * logs).sum(-1, keepdim=True) + (pt * logs).sum(-1, keepdim=True)
    valid = torch.ones(s64.shape[0], dtype=torch.bool) if labels is None else (labels.reshape(-1) != ignore_index).cpu()
    n_valid = max(int(valid.sum()), 1)
    grad = (1 - alpha) * temperature / n_valid * (ps + pt) * (1 + logs + row) + alpha / n_valid * (ps + 1)
    ce = torch.logsumexp(s64, -1).abs() + s_abs.amax(-1) + 1.0
    loss_rows = (1 - alpha) * temperature**2 * row.squeeze(-1) + alpha * ce
    loss = loss_rows[valid.to(loss_rows.device)].sum() / n_valid
    return loss, grad * valid.to(grad.device)[:, None]


def grad_terms(s, t, labels, temperature, alpha, divergence):
    return kd_terms(s, t, labels, temperature, alpha, divergence)[1]


def assert_kd_matches(loss, grad, ref_loss, ref_grad, s, t, labels, **kw):
    """Ours and the eager reference, both float64, each within (vocab + rows) roundings of the terms
    (a log-sum-exp or divergence over the vocabulary, then the mean over the rows) plus a few single
    operations (exp, log, /T, ·T², ·α): so together within twice that."""
    vocab = s.shape[-1]
    rows = s.numel() // max(vocab, 1)
    loss_terms, g_terms = kd_terms(s, t, labels, **kw)
    chain = 2 * (vocab + rows)
    assert_within_rounding("loss", loss, ref_loss, loss_terms, terms=chain, roundings=16)
    assert_within_rounding("grad", grad, ref_grad, g_terms.reshape(grad.shape), terms=chain, roundings=16)


def assert_fused_matches(ours, ref, hs, ws, ht, wt, labels, **kw):
    """fused_linear_kd_loss against the eager reference, both float64: kd_terms on the logits h·Wᵀ, whose
    own terms |h|·|W|ᵀ enter every log-probability; the head's gradients sum the logits' gradient terms
    against |W| and |h|. Chain: hidden sizes, vocabulary and rows, on both sides."""
    loss, dh, dw = ours
    ref_loss, ref_dh, ref_dw = ref
    d = lambda x: x.detach().double().reshape(-1, x.shape[-1])  # noqa: E731
    s, t = d(hs) @ d(ws).T, d(ht) @ d(wt).T
    s_abs, t_abs = d(hs).abs() @ d(ws).abs().T, d(ht).abs() @ d(wt).abs().T
    loss_terms, g_terms = kd_terms(s, t, labels, s_abs=s_abs, t_abs=t_abs, **kw)
    chain = 2 * (ws.shape[0] + s.shape[0] + hs.shape[-1] + ht.shape[-1])
    assert_within_rounding("loss", loss, ref_loss, loss_terms, terms=chain, roundings=16)
    dh_terms = (g_terms @ d(ws).abs()).reshape(dh.shape)
    assert_within_rounding("dh", dh, ref_dh.reshape(dh.shape), dh_terms, terms=chain, roundings=16)
    if dw is not None:
        assert_within_rounding("dw", dw, ref_dw, g_terms.T @ d(hs).abs(), terms=chain, roundings=16)


# ---- autograd behaviour -------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(device, divergence):
    s, t = make_logits(4, 23, device, spread=1.0)
    labels = torch.tensor([3, -100, 0, 22], device=device)
    s.requires_grad_()
    fn = lambda x: pf.ops.kd_loss(x, t, labels, temperature=1.7, alpha=0.35, divergence=divergence)  # noqa: E731
    # central differences with step h = 1e-6 are off by about u·|loss|/h (rounding: 1e-10 for a loss of
    # order 1, u = 1.1e-16) plus h²·|loss'''|/6 (1e-12): atol 1e-8 sits above both, far below a wrong term
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def test_scaled_and_retained_backward(device):
    s, t = make_logits(5, 40, device)
    labels = make_labels(5, 40, device)
    sv = s.clone().requires_grad_()
    loss = pf.ops.kd_loss(sv, t, labels)
    (3.0 * loss).backward(retain_graph=True)
    _, ref_grad = loss_and_grad(reference.kd_loss, s, t, labels)
    g_terms = kd_terms(s, t, labels)[1]
    chain = 2 * (s.shape[-1] + s.shape[0])
    assert_within_rounding("3·grad", sv.grad, 3.0 * ref_grad, 3.0 * g_terms, terms=chain, roundings=16)
    loss.backward(retain_graph=True)  # grad_output 1: the saved gradient is handed over, then accumulated
    loss.backward()
    # two more roundings: the accumulations
    assert_within_rounding("5·grad", sv.grad, 5.0 * ref_grad, 5.0 * g_terms, terms=chain, roundings=18)


def test_no_grad_forward_matches(device):
    s, t = make_logits(6, 100, device)
    labels = make_labels(6, 100, device)
    with_grad = pf.ops.kd_loss(s.clone().requires_grad_(), t, labels, divergence="js")
    with torch.no_grad():
        without = pf.ops.kd_loss(s.clone().requires_grad_(), t, labels, divergence="js")
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=0)


def test_teacher_gets_no_gradient(device):
    s, t = make_logits(3, 30, device)
    t.requires_grad_()
    s.requires_grad_()
    pf.ops.kd_loss(s, t, None, alpha=0.0).backward()
    assert s.grad is not None and t.grad is None


def test_torch_compile_fullgraph():
    s, t = make_logits(4, 64, "cpu", dtype=torch.float32)
    labels = make_labels(4, 64, "cpu")
    compiled = torch.compile(
        lambda a, b, c: pf.ops.kd_loss(a, b, c, temperature=2.0), fullgraph=True, backend="aot_eager"
    )
    sv = s.clone().requires_grad_()
    loss = compiled(sv, t, labels)
    loss.backward()
    ref_loss, ref_grad = loss_and_grad(pf.ops.kd_loss, s, t, labels, temperature=2.0)
    # aot_eager runs our op's kernels eagerly, as the uncompiled call does: bit-identical
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(sv.grad, ref_grad, rtol=0, atol=0)


# ---- fused linear ---------------------------------------------------------------------------------------


def make_hidden(n, h, ht, v, device, dtype=torch.float64, generator=None):
    def r(*shape, scale):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(device=device, dtype=dtype)

    return r(n, h, scale=1.0), r(v, h, scale=h**-0.5 * 3), r(n, ht, scale=1.0), r(v, ht, scale=ht**-0.5 * 3)


def fused_grads(fn, hs, ws, ht, wt, labels, train_weight=True, **kw):
    hs = hs.detach().clone().requires_grad_()
    ws = ws.detach().clone().requires_grad_(train_weight)
    loss = fn(hs, ws, ht, wt, labels, **kw)
    loss.backward()
    return loss.detach(), hs.grad, ws.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [0, 1, 4])
def test_fused_linear_matches_reference_float64(device, divergence, chunk_size):
    hs, ws, ht, wt = make_hidden(10, 24, 40, 333, device)
    labels = make_labels(10, 333, device, ignore_every=3)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence)
    ours = fused_grads(pf.ops.fused_linear_kd_loss, hs, ws, ht, wt, labels, chunk_size=chunk_size, **kw)
    ref = fused_grads(reference.fused_linear_kd_loss, hs, ws, ht, wt, labels, **kw)
    assert_fused_matches(ours, ref, hs, ws, ht, wt, labels, **kw)


def test_fused_linear_frozen_head_and_leading_dims(device):
    hs, ws, ht, wt = make_hidden(12, 16, 16, 101, device)
    labels = make_labels(12, 101, device)
    shape3 = lambda x: x.reshape(3, 4, x.shape[-1])  # noqa: E731
    loss, dh, dw = fused_grads(
        pf.ops.fused_linear_kd_loss,
        shape3(hs),
        ws,
        shape3(ht),
        wt,
        labels.reshape(3, 4),
        train_weight=False,
        chunk_size=5,
    )
    ref = fused_grads(reference.fused_linear_kd_loss, hs, ws, ht, wt, labels, train_weight=False)
    assert dw is None and dh.shape == (3, 4, 16)
    assert_fused_matches((loss, dh, dw), ref, hs, ws, ht, wt, labels)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fused_linear_low_precision(device, dtype):
    g = torch.Generator().manual_seed(2)
    hs, ws, ht, wt = make_hidden(64, 32, 48, 1001, device, dtype=dtype, generator=g)
    labels = make_labels(64, 1001, device, generator=g)
    kw = dict(temperature=2.0, alpha=0.5)
    ours = fused_grads(pf.ops.fused_linear_kd_loss, hs, ws, ht, wt, labels, chunk_size=24, **kw)
    eager = fused_grads(reference.fused_linear_kd_loss, hs, ws, ht, wt, labels, **kw)
    ref = fused_grads(reference.fused_linear_kd_loss, hs.double(), ws.double(), ht.double(), wt.double(), labels, **kw)
    for name, a, e, r in zip(("loss", "dh", "dw"), ours, eager, ref, strict=True):
        assert a.dtype == dtype
        err, bound = low_precision_error_bound(a, e, r)
        assert err <= bound, f"{name} error {err:.3e} > {bound:.3e}"


def test_fused_linear_gradcheck(device):
    hs, ws, ht, wt = make_hidden(5, 6, 7, 19, device)
    labels = torch.tensor([1, -100, 18, 0, 5], device=device)
    hs.requires_grad_()
    ws.requires_grad_()

    def fn(h, w):
        return pf.ops.fused_linear_kd_loss(
            h, w, ht, wt, labels, temperature=1.5, alpha=0.2, divergence="js", chunk_size=2
        )

    assert torch.autograd.gradcheck(fn, (hs, ws), eps=1e-6, atol=1e-8)  # atol: see test_gradcheck


# ---- opcheck ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_opcheck(device, divergence):
    s, t = make_logits(5, 37, device, dtype=torch.float32)
    labels = make_labels(5, 37, device)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.pyfastpeft.kd_loss, (s, t, labels, 2.0, 0.5, -100, divergence, True))
    torch.library.opcheck(torch.ops.pyfastpeft.kd_loss, (s.detach(), t, None, 1.0, 0.0, -100, divergence, False))
    hs, ws, ht, wt = make_hidden(6, 8, 8, 37, device, dtype=torch.float32)
    hs.requires_grad_()
    ws.requires_grad_()
    torch.library.opcheck(
        torch.ops.pyfastpeft.fused_linear_kd_loss,
        (hs, ws, ht, wt, labels.repeat(2)[:6], 1.5, 0.5, -100, divergence, 4, [True, True]),
    )
    torch.library.opcheck(
        torch.ops.pyfastpeft.fused_linear_kd_loss,
        (hs, ws.detach(), ht, wt, None, 1.0, 0.0, -100, divergence, 0, [True, False]),
    )


# ---- bad input -------------------------------------------------------------------------------------------


def test_bad_input(device):
    s, t = make_logits(4, 10, device, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    cases = [
        (lambda: pf.ops.kd_loss(s, t[:, :9], labels), "vocabulary size"),
        (lambda: pf.ops.kd_loss(s, t[:3], labels), "teacher_logits"),
        (lambda: pf.ops.kd_loss(s, t.double(), labels), "teacher_logits: expected dtype"),
        (lambda: pf.ops.kd_loss(s, t, labels[:3]), "labels"),
        (lambda: pf.ops.kd_loss(s, t, labels.float()), "labels: expected an int64 or int32"),
        (lambda: pf.ops.kd_loss(s, t, torch.tensor([0, 1, 10, 3], device=device)), "labels: every label"),
        (lambda: pf.ops.kd_loss(s, t, torch.tensor([0, -1, 2, 3], device=device)), "labels: every label"),
        (lambda: pf.ops.kd_loss(s, t, None, alpha=0.5), "labels: required"),
        (lambda: pf.ops.kd_loss(s, t, labels, temperature=0.0), "temperature"),
        (lambda: pf.ops.kd_loss(s, t, labels, alpha=1.5), "alpha"),
        (lambda: pf.ops.kd_loss(s, t, labels, divergence="kl"), "divergence"),
        (lambda: pf.ops.kd_loss(s.int(), t.int(), labels), "student_logits"),
        (
            lambda: torch.ops.pyfastpeft.kd_loss(s[0], t[0], None, 1.0, 0.0, -100, "js", False),
            "student_logits",
        ),
        (lambda: torch.ops.pyfastpeft.kd_loss(s, t, labels, 1.0, 0.5, -100, "xx", False), "divergence"),
    ]
    hs, ws, ht, wt = make_hidden(4, 8, 6, 10, device, dtype=torch.float32)
    cases += [
        (lambda: pf.ops.fused_linear_kd_loss(hs, ws, ht, wt[:9], labels), "vocabulary size"),
        (lambda: pf.ops.fused_linear_kd_loss(hs, ws[:, :7], ht, wt, labels), "student_weight"),
        (lambda: pf.ops.fused_linear_kd_loss(hs, ws, ht, wt[:, :5], labels), "teacher_weight"),
        (lambda: pf.ops.fused_linear_kd_loss(hs, ws, ht[:3], wt, labels), "teacher_hidden"),
        (
            lambda: pf.ops.fused_linear_kd_loss(hs, ws.half(), ht, wt, labels),
            "student_weight: expected dtype",
        ),
        (lambda: pf.ops.fused_linear_kd_loss(hs, ws, ht, wt, labels + 20), "labels: every label"),
        (lambda: pf.ops.fused_linear_kd_loss(hs, ws, ht, wt, labels, chunk_size=-1), "chunk_size"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
