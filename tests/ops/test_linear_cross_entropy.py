"""fused_linear_cross_entropy against the float64 eager head and loss (loss, dh, dW): chunk sizes, ignore
index, sizes 0 and 1, odd shapes, strides, every dtype, gradcheck, opcheck, bad input; and
causal_lm_loss against a transformers model's own loss, through a PeftModel, with its fallbacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft as pf
from pyfastpeft.ops import reference
from tests.conftest import FLOAT_DTYPES, assert_within_rounding, low_precision_error_bound
from tests.ops.test_distill import kd_terms, make_labels


def make_head(n, h, v, device, dtype=torch.float64, generator=None):
    hidden = torch.randn(n, h, dtype=torch.float64, generator=generator)
    weight = torch.randn(v, h, dtype=torch.float64, generator=generator) * (3 * max(h, 1) ** -0.5)
    return hidden.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)


def make_targets(n, v, device, ignore_every=3, **kw):
    """test_distill's labels, every third row ignored unless told otherwise."""
    return make_labels(n, v, device, ignore_every=ignore_every, **kw)


def grads(fn, hidden, weight, labels, train_weight=True, **kw):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(train_weight)
    loss = fn(hidden, weight, labels, **kw)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_matches(ours, ref, hidden, weight, labels, ignore_index=-100):
    """Ours and the eager reference, both float64, each within roundings of the absolute terms: the
    cross-entropy's log-sum-exp and label logit over logits h·Wᵀ whose own terms are |h|·|W|ᵀ (kd_terms at
    alpha = 1), the gradient's softmax and one-hot summed against |W| (dh) and |h| (dW). Chain: the
    vocabulary, the rows and the hidden size, on both sides."""
    loss, dh, dw = ours
    ref_loss, ref_dh, ref_dw = ref
    h64 = hidden.detach().double().reshape(-1, hidden.shape[-1])
    w64 = weight.detach().double()
    logits = h64 @ w64.T
    loss_terms, g_terms = kd_terms(
        logits, torch.zeros_like(logits), labels, alpha=1.0, ignore_index=ignore_index, s_abs=h64.abs() @ w64.abs().T
    )
    chain = 2 * (weight.shape[0] + h64.shape[0] + hidden.shape[-1])
    assert_within_rounding("loss", loss, ref_loss, loss_terms, terms=chain, roundings=16)
    if dh is not None:
        dh_terms = (g_terms @ w64.abs()).reshape(dh.shape)
        assert_within_rounding("dh", dh, ref_dh.reshape(dh.shape), dh_terms, terms=chain, roundings=16)
    if dw is not None:
        assert_within_rounding("dw", dw, ref_dw, g_terms.T @ h64.abs(), terms=chain, roundings=16)


# ---- float64 against the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [0, 1, 4, 10, 100])
@pytest.mark.parametrize("train_weight", [True, False])
def test_matches_reference_float64(device, chunk_size, train_weight):
    hidden, weight = make_head(10, 24, 333, device)
    labels = make_targets(10, 333, device)
    ours = grads(pf.ops.fused_linear_cross_entropy, hidden, weight, labels, train_weight, chunk_size=chunk_size)
    ref = grads(reference.fused_linear_cross_entropy, hidden, weight, labels, train_weight)
    assert (ours[2] is None) == (not train_weight)
    assert_matches(ours, ref, hidden, weight, labels)


def test_custom_ignore_index_int32_labels_and_leading_dims(device):
    hidden, weight = make_head(12, 16, 101, device)
    labels = make_targets(12, 101, device, ignore_index=7)  # 7 is also a real token id: ignored all the same
    shaped = hidden.reshape(3, 4, 16)
    ours = grads(
        pf.ops.fused_linear_cross_entropy, shaped, weight, labels.reshape(3, 4).int(), ignore_index=7, chunk_size=5
    )
    ref = grads(reference.fused_linear_cross_entropy, hidden, weight, labels, ignore_index=7)
    assert ours[1].shape == (3, 4, 16)
    assert_matches(ours, ref, hidden, weight, labels, ignore_index=7)


@pytest.mark.parametrize("n, h, v", [(0, 8, 11), (1, 8, 11), (5, 1, 11), (5, 8, 1), (1, 1, 1), (7, 33, 515)])
def test_sizes_zero_and_one_and_odd_shapes(device, n, h, v):
    g = torch.Generator().manual_seed(n * 1000 + h * 10 + v)
    hidden, weight = make_head(n, h, v, device, generator=g)
    labels = make_targets(n, v, device, ignore_every=4, generator=g)
    ours = grads(pf.ops.fused_linear_cross_entropy, hidden, weight, labels, chunk_size=3)
    ref = grads(reference.fused_linear_cross_entropy, hidden, weight, labels)
    assert ours[1].shape == (n, h) and ours[2].shape == (v, h)
    assert_matches(ours, ref, hidden, weight, labels)


def test_every_token_ignored_gives_zero(device):
    hidden, weight = make_head(6, 8, 20, device)
    labels = torch.full((6,), -100, device=device)
    loss, dh, dw = grads(pf.ops.fused_linear_cross_entropy, hidden, weight, labels)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_non_contiguous_views(device):
    g = torch.Generator().manual_seed(3)
    big_h, big_w = make_head(20, 48, 90, device, generator=g)
    hidden = big_h[::2, ::2]  # [10, 24], strided rows and columns
    weight = big_w.T.contiguous().T[::2, ::2]  # [45, 24], a column-major matrix's strided view
    labels = make_targets(10, 45, device, generator=g)
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    ours = grads(pf.ops.fused_linear_cross_entropy, hidden, weight, labels, chunk_size=4)
    ref = grads(reference.fused_linear_cross_entropy, hidden, weight, labels)
    assert_matches(ours, ref, hidden, weight, labels)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 9),
    h=st.integers(1, 12),
    v=st.integers(1, 70),
    chunk=st.integers(0, 6),
    spread=st.sampled_from([0.1, 1.0, 20.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(n, h, v, chunk, spread, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = make_head(n, h, v, "cpu", generator=g)
    hidden = hidden * spread
    labels = make_targets(n, v, "cpu", ignore_every=3, generator=g)
    ours = grads(pf.ops.fused_linear_cross_entropy, hidden, weight, labels, chunk_size=chunk)
    ref = grads(reference.fused_linear_cross_entropy, hidden, weight, labels)
    assert_matches(ours, ref, hidden, weight, labels)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_low_precision(device, dtype):
    g = torch.Generator().manual_seed(2)
    hidden, weight = make_head(64, 32, 1001, device, dtype=dtype, generator=g)
    labels = make_targets(64, 1001, device, generator=g)
    ours = grads(pf.ops.fused_linear_cross_entropy, hidden, weight, labels, chunk_size=24)
    eager = grads(reference.fused_linear_cross_entropy, hidden, weight, labels)
    ref = grads(reference.fused_linear_cross_entropy, hidden.double(), weight.double(), labels)
    # the loss comes out in float32 (as transformers computes it) from logits rounded to `dtype`: its
    # error floor is two roundings of `dtype` at the size of its absolute terms (kd_terms at alpha = 1)
    assert ours[0].dtype == torch.float32
    h64, w64 = hidden.double(), weight.double()
    loss_terms = kd_terms(
        h64 @ w64.T, torch.zeros(64, 1001, dtype=torch.float64), labels, alpha=1.0, s_abs=h64.abs() @ w64.abs().T
    )[0]
    err = (ours[0].double() - ref[0]).abs().item()
    bound = 2 * (eager[0].double() - ref[0]).abs().item() + 2 * torch.finfo(dtype).eps * loss_terms.item()
    assert err <= bound, f"loss error {err:.3e} > {bound:.3e}"
    for name, a, e, r in zip(("dh", "dw"), ours[1:], eager[1:], ref[1:], strict=True):
        assert a.dtype == dtype
        err, bound = low_precision_error_bound(a, e, r)
        assert err <= bound, f"{name} error {err:.3e} > {bound:.3e}"


# ---- autograd ----------------------------------------------------------------------------------------------


def test_gradcheck(device):
    hidden, weight = make_head(5, 6, 19, device)
    labels = torch.tensor([1, -100, 18, 0, 5], device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    fn = lambda a, b: pf.ops.fused_linear_cross_entropy(a, b, labels, chunk_size=2)  # noqa: E731
    # atol: central differences with h = 1e-6 are off by ~u·|loss|/h = 1e-10 (see test_distill's gradcheck)
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-8)


def test_scaled_and_retained_backward(device):
    hidden, weight = make_head(5, 8, 40, device)
    labels = make_targets(5, 40, device)
    h = hidden.clone().requires_grad_()
    loss = pf.ops.fused_linear_cross_entropy(h, weight, labels)
    (3.0 * loss).backward(retain_graph=True)
    loss.backward()  # grad_output 1: the saved gradient is handed over, then accumulated
    _, ref_dh, _ = grads(reference.fused_linear_cross_entropy, hidden, weight, labels, train_weight=False)
    h64, w64 = hidden.double(), weight.double()
    g_terms = kd_terms(
        h64 @ w64.T, torch.zeros(5, 40, dtype=torch.float64), labels, alpha=1.0, s_abs=h64.abs() @ w64.abs().T
    )[1]
    chain = 2 * (40 + 5 + 8)
    assert_within_rounding("4·dh", h.grad, 4.0 * ref_dh, 4.0 * (g_terms @ w64.abs()), terms=chain, roundings=18)


def test_no_grad_forward_matches(device):
    hidden, weight = make_head(6, 8, 100, device)
    labels = make_targets(6, 100, device)
    with_grad = pf.ops.fused_linear_cross_entropy(hidden.clone().requires_grad_(), weight, labels)
    with torch.no_grad():
        without = pf.ops.fused_linear_cross_entropy(hidden.clone().requires_grad_(), weight, labels)
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=0)


def test_opcheck(device):
    hidden, weight = make_head(6, 8, 37, device, dtype=torch.float32)
    labels = make_targets(6, 37, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    op = torch.ops.pyfastpeft.fused_linear_cross_entropy
    torch.library.opcheck(op, (hidden, weight, labels, -100, 4, [True, True]))
    torch.library.opcheck(op, (hidden, weight.detach(), labels.int(), -100, 0, [True, False]))
    torch.library.opcheck(op, (hidden.detach(), weight.detach(), labels.clamp(min=0), 3, 1, [False, False]))


def test_bad_input(device):
    hidden, weight = make_head(4, 8, 10, device, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    op = torch.ops.pyfastpeft.fused_linear_cross_entropy
    f = pf.ops.fused_linear_cross_entropy
    cases = [
        (lambda: f(hidden, weight[:, :7], labels), "weight: expected shape"),
        (lambda: f(hidden, weight.double(), labels), "weight: expected dtype"),
        (lambda: f(hidden, weight, labels[:3]), "labels"),
        (lambda: f(hidden, weight, labels.float()), "labels: expected an int64 or int32"),
        (lambda: f(hidden, weight, labels + 7), "labels: every label"),
        (lambda: f(hidden, weight, labels - 1), "labels: every label"),
        (lambda: f(hidden, weight, None), "labels: required"),
        (lambda: f(hidden, weight, labels, chunk_size=-1), "chunk_size"),
        (lambda: f(hidden[0, 0], weight, labels), "hidden"),
        (lambda: f(hidden.int(), weight.int(), labels), "hidden"),
        (lambda: f(hidden, weight[:0], labels), "weight: expected a vocabulary"),
        (lambda: op(hidden, weight, labels, -100, -2, [True, True]), "chunk_size"),
        (lambda: op(hidden[0], weight, labels, -100, 0, [True, True]), "hidden"),
        (lambda: op(hidden, weight[0], labels, -100, 0, [True, True]), "weight"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


# ---- causal_lm_loss --------------------------------------------------------------------------------------


def tiny_llama(seed=0, tie=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).double().train()


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_loss_matches_the_models_loss_through_lora(tie):
    model = pf.get_peft_model(
        tiny_llama(tie=tie), pf.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # B = 0 at init: give the adapters a say in the loss
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    labels[2, -2:] = -100  # padding
    assert pf.lm_loss.fused_head(model) is not None
    trainable = [p for p in model.parameters() if p.requires_grad]

    ours = pf.causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
    ours_grads = torch.autograd.grad(ours, trainable)
    # the model's own loss, in float64 (transformers computes it in float32 whatever the model's dtype)
    logits = model(input_ids=ids, attention_mask=mask).logits
    ref = reference.fused_linear_cross_entropy(logits[:, :-1], torch.eye(97, dtype=torch.float64), labels[:, 1:])
    ref_grads = torch.autograd.grad(ref, trainable)
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, labels=labels).loss, ref.float(), rtol=1e-6, atol=1e-6
    )
    # float64 through a whole model: the two differ only in how the head's products and the loss's
    # sums are ordered, each ~1e-16 relative per term
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_causal_lm_loss_falls_back_to_the_models_forward():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    # a head that is not a plain nn.Linear (e.g. adapted): the model's own loss, the same value
    peft_head = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=2, target_modules=["lm_head"]))
    assert pf.lm_loss.fused_head(peft_head) is None
    torch.testing.assert_close(
        pf.causal_lm_loss(peft_head, ids, input_ids=ids), peft_head(input_ids=ids, labels=ids).loss, rtol=0, atol=0
    )
    # a model type whose forward is not known to be plain
    model.config.model_type = "gemma2"
    assert pf.lm_loss.fused_head(model) is None
    # the built-in tiny model (no transformers config)
    from pyfastpeft.models.llama import TinyLlamaForCausalLM

    assert pf.lm_loss.fused_head(TinyLlamaForCausalLM()) is None
    # prompt tuning: its virtual tokens go through the wrapper's forward
    prompt = pf.get_peft_model(tiny_llama(), pf.PromptTuningConfig(num_virtual_tokens=3))
    assert pf.lm_loss.fused_head(prompt) is None
    with pytest.raises(ValueError, match="labels"):
        pf.causal_lm_loss(model, None, input_ids=ids)


def test_causal_lm_loss_through_hugging_face_peft():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert pf.lm_loss.fused_head(model) is not None
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ours = pf.causal_lm_loss(model, ids, input_ids=ids)
    ours_grads = torch.autograd.grad(ours, trainable)
    logits = model(input_ids=ids).logits
    ref = reference.fused_linear_cross_entropy(logits[:, :-1], torch.eye(97, dtype=torch.float64), ids[:, 1:])
    ref_grads = torch.autograd.grad(ref, trainable)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    prompt = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert pf.lm_loss.fused_head(prompt) is None


def test_causal_lm_loss_num_items_in_batch_and_ignore_index():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    n_items = int((labels[:, 1:] != -100).sum())
    logits = model(input_ids=ids).logits
    # the sum over the labelled tokens over a count of items from several micro-batches (here 3 × n)
    ref = reference.fused_linear_cross_entropy(logits[:, :-1], torch.eye(97, dtype=torch.float64), labels[:, 1:])
    ours = pf.causal_lm_loss(model, labels, input_ids=ids, num_items_in_batch=3 * n_items)
    torch.testing.assert_close(ours, ref * n_items / (3 * n_items), rtol=1e-12, atol=1e-12)
    # another ignore index: the fused head knows it, the model's own loss only -100
    other = torch.where(labels == -100, torch.full_like(labels, 96), labels)
    ours = pf.causal_lm_loss(model, other, input_ids=ids, ignore_index=96)
    ref = reference.fused_linear_cross_entropy(
        logits[:, :-1], torch.eye(97, dtype=torch.float64), other[:, 1:], ignore_index=96
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    unfusable = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="ignore_index"):
        pf.causal_lm_loss(unfusable, other, input_ids=ids, ignore_index=96)
    torch.testing.assert_close(
        pf.causal_lm_loss(unfusable, labels, input_ids=ids, num_items_in_batch=7),
        unfusable(input_ids=ids, labels=labels, num_items_in_batch=7).loss,
        rtol=0,
        atol=0,
    )
