"""Fuzz: the distillation losses (on logits, and fused with the LM heads) against the float64 eager
reference: loss and gradients, every divergence, temperature, alpha, ignored tokens, any shapes (0 and 1
included), layouts and dtypes.

Rounding scale: each log-softmax entry is ``z − max − log Σ exp(z − max)`` with z = logit / T, so the
terms the loss adds are about as large as the largest |log-softmax| of student and teacher (M); the
loss weighs them by (1 − α)·T² + α, the gradient of the mean by ((1 − α)·T + α)·2 / (valid tokens)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyfastpeft as pf
from pyfastpeft.ops import reference
from tests.fuzz.common import FEATURES_MIN, FUZZ, VOCAB_MIN, assert_close_to_float64, dtypes, layouts, seeds, tensor

DIVERGENCES = ["forward_kl", "reverse_kl", "js"]
options = dict(
    temperature=st.sampled_from([0.5, 1.0, 2.5]),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    divergence=st.sampled_from(DIVERGENCES),
)


def draw_labels(lead, vocab, alpha, ignore_share, seed):
    if alpha == 0 and ignore_share < 0:
        return None  # pure distillation: every token counts
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, tuple(lead), generator=g)
    drop = torch.rand(tuple(lead), generator=g) < max(0.0, ignore_share)
    return labels.masked_fill(drop, -100)


def rounding_scales(s64, t64, labels, temperature, alpha):
    """(loss scale, logit-gradient scale) as in the module docstring."""
    if s64.numel() == 0:
        return torch.zeros(()), torch.zeros(())
    m = 1.0
    for z in (s64, t64):
        m += torch.log_softmax(z / temperature, dim=-1).abs().max().item()
    if alpha > 0:
        m += torch.log_softmax(s64, dim=-1).abs().max().item()
    valid = s64.shape[:-1].numel() if labels is None else int((labels != -100).sum())
    loss_scale = ((1 - alpha) * temperature**2 + alpha) * m
    grad_scale = 2 * ((1 - alpha) * temperature + alpha) * m / max(1, valid)
    return torch.tensor(loss_scale, dtype=torch.float64), torch.tensor(grad_scale, dtype=torch.float64)


@FUZZ
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    vocab=st.integers(VOCAB_MIN, 700),
    spread=st.sampled_from([0.1, 3.0, 30.0]),
    ignore_share=st.sampled_from([-1.0, 0.0, 0.3, 1.0]),
    dtype=dtypes,
    s_layout=layouts,
    t_layout=layouts,
    seed=seeds,
    **options,
)
def test_kd_loss(lead, vocab, spread, ignore_share, dtype, s_layout, t_layout, seed, temperature, alpha, divergence):
    labels = draw_labels(lead, vocab, alpha, ignore_share, seed)
    s = tensor((*lead, vocab), dtype, s_layout, seed, spread)
    t = tensor((*lead, vocab), dtype, t_layout, seed + 1, spread)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence)

    def loss_and_grad(fn, s, t):
        s = s.detach().requires_grad_()
        loss = fn(s, t, labels, **kw)
        (grad,) = torch.autograd.grad(loss, s)
        return loss.detach(), grad

    ours = loss_and_grad(pf.ops.kd_loss, s, t)
    lowp = loss_and_grad(reference.kd_loss, s, t)
    ref64 = loss_and_grad(reference.kd_loss, s.double(), t.double())
    assert ours[0].dtype == dtype
    scales = rounding_scales(s.double(), t.double(), labels, temperature, alpha)
    terms = vocab + s.shape[:-1].numel()  # the softmax sums, then the mean over tokens
    for name, a, b, c, m in zip(["loss", "grad"], ours, lowp, ref64, scales, strict=True):
        assert_close_to_float64(name, a, b, c, m, terms=terms)


@FUZZ
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    hidden=st.integers(FEATURES_MIN, 24),
    teacher_hidden=st.integers(FEATURES_MIN, 24),
    vocab=st.integers(VOCAB_MIN, 300),
    ignore_share=st.sampled_from([-1.0, 0.0, 0.3, 1.0]),
    chunk_size=st.sampled_from([0, 1, 3]),
    train_weight=st.booleans(),
    dtype=dtypes,
    h_layout=layouts,
    w_layout=layouts,
    seed=seeds,
    **options,
)
def test_fused_linear_kd_loss(
    lead,
    hidden,
    teacher_hidden,
    vocab,
    ignore_share,
    chunk_size,
    train_weight,
    dtype,
    h_layout,
    w_layout,
    seed,
    temperature,
    alpha,
    divergence,
):
    labels = draw_labels(lead, vocab, alpha, ignore_share, seed)
    h = tensor((*lead, hidden), dtype, h_layout, seed)
    w = tensor((vocab, hidden), dtype, w_layout, seed + 1, 3 * max(hidden, 1) ** -0.5)
    ht = tensor((*lead, teacher_hidden), dtype, "contiguous", seed + 2)
    wt = tensor((vocab, teacher_hidden), dtype, "transposed", seed + 3, 3 * max(teacher_hidden, 1) ** -0.5)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence)

    def loss_and_grads(fn, h, w, **extra):
        h = h.detach().requires_grad_()
        w = w.detach().requires_grad_(train_weight)
        loss = fn(h, w, ht.to(h.dtype), wt.to(h.dtype), labels, **kw, **extra)
        return [loss.detach(), *torch.autograd.grad(loss, [h, w] if train_weight else [h])]

    ours = loss_and_grads(pf.ops.fused_linear_kd_loss, h, w, chunk_size=chunk_size)
    lowp = loss_and_grads(reference.fused_linear_kd_loss, h, w)
    ref64 = loss_and_grads(reference.fused_linear_kd_loss, h.double(), w.double())
    h64, w64 = h.double(), w.double()
    s64 = h64 @ w64.t()
    loss_scale, logit_grad_scale = rounding_scales(s64, ht.double() @ wt.double().t(), labels, temperature, alpha)
    # the logits themselves are sums of products: their rounding is relative to Σ|h·w|
    logit_abs = (h64.abs() @ w64.abs().t()).max().item() if s64.numel() else 0.0
    loss_scale = loss_scale + 4 * ((1 - alpha) * temperature + alpha) * logit_abs / temperature
    scales = [loss_scale, logit_grad_scale * w64.abs().sum(0).max().item() if w64.numel() else 0.0]
    if train_weight:
        h_rows = h64.reshape(h64.shape[:-1].numel(), hidden)
        scales.append(logit_grad_scale * h_rows.abs().sum(0).max().item() if h_rows.numel() else 0.0)
    scales = [torch.as_tensor(m, dtype=torch.float64) for m in scales]
    terms = hidden + teacher_hidden + vocab + h64.shape[:-1].numel()  # logits, softmax sums, token sums
    for name, a, b, c, m in zip(["loss", "dh", "dW"], ours, lowp, ref64, scales, strict=False):
        assert_close_to_float64(name, a, b, c, m, terms=terms)
