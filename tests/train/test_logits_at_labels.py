"""The training loop asks a transformers causal LM for its logits only where a next token is labelled:
the same summed loss and the same gradients as from every position's logits."""

from __future__ import annotations

import pytest
import torch

from pyfastpeft import LoraConfig, get_peft_model
from pyfastpeft.models.data import Batch
from pyfastpeft.train.trainer import logits_at_labels, token_loss
from tests.tuners.hf_tiny_models import llama_config

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    cfg = llama_config(vocab_size=97, intermediate_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


def lora_base() -> torch.nn.Module:
    """tiny_llama with LoRA on q and v, B off zero so that the adapter's gradients all count: the base
    model, adapters injected (what the training loop is given)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base = model.base_model.model
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return base


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def prompt_and_answer_batch() -> Batch:
    # three rows of 12 tokens: labels on each row's answer only, at different positions, one row padded
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 8:12] = ids[0, 8:12]
    labels[1, 5:9] = ids[1, 5:9]
    labels[2, 9:11] = ids[2, 9:11]
    mask = torch.ones_like(ids)
    mask[2, 11] = 0
    return Batch(ids, labels, mask)


def loss_and_grads(model, batch, at_labels):
    count = int((batch.labels[:, 1:] != -100).sum())
    loss, share = token_loss(model, batch, count, 1, None, at_labels)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return share.item(), grads


def test_the_loss_and_gradients_equal_every_positions():
    base = lora_base()
    assert logits_at_labels(base)
    batch = prompt_and_answer_batch()
    full, full_grads = loss_and_grads(base, batch, at_labels=False)
    kept, kept_grads = loss_and_grads(base, batch, at_labels=True)
    assert kept == pytest.approx(full, rel=1e-12)
    assert full_grads.keys() == kept_grads.keys() and full_grads
    for name, g in full_grads.items():
        torch.testing.assert_close(kept_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_a_batch_without_labels_sums_to_zero():
    model = tiny_llama()
    batch = prompt_and_answer_batch()
    batch = Batch(batch.input_ids, torch.full_like(batch.labels, -100), batch.attention_mask)
    loss, _ = token_loss(model, batch, 1, 1, None, at_labels=True)
    assert loss.item() == 0.0


def test_only_models_that_take_logits_to_keep_and_see_real_positions():
    from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM

    assert logits_at_labels(tiny_llama())
    builtin = TinyLlamaForCausalLM(TinyLlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16))
    assert not logits_at_labels(builtin)
    routed = tiny_llama()
    routed.add_module("prompt_encoder", torch.nn.Linear(2, 2))  # as route_base_calls leaves it
    assert not logits_at_labels(routed)


def test_the_fused_head_gives_the_same_loss_and_gradients():
    from pyfastpeft.lm_loss import fused_head

    base = lora_base()
    fused = fused_head(base)
    assert fused is not None
    batch = prompt_and_answer_batch()
    count = int((batch.labels[:, 1:] != -100).sum())

    # the reference in float64 throughout (the unfused path computes the cross-entropy in float32)
    logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    full, full_grads = (total / count).item(), grads_of(base, total / count)
    loss, share = token_loss(base, batch, count, 1, None, fused=fused)
    ours_grads = grads_of(base, loss)
    assert share.item() == pytest.approx(full, rel=1e-12)
    assert full_grads.keys() == ours_grads.keys() and full_grads
    for name, g in full_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
    routed = tiny_llama()
    routed.add_module("prompt_encoder", torch.nn.Linear(2, 2))  # as route_base_calls leaves it
    assert fused_head(routed) is None


def test_distillation_from_the_fused_head_equals_the_kd_loss_on_every_logit():
    from pyfastpeft.distill import DistillationLoss
    from pyfastpeft.lm_loss import fused_head
    from pyfastpeft.train.methods import kd_summed_losses

    base = lora_base()
    torch.manual_seed(1)
    teacher = transformers.LlamaForCausalLM(llama_config(vocab_size=97, intermediate_size=64)).double()
    loss = DistillationLoss(temperature=2.0, alpha=0.3)
    summed_loss, from_hidden = kd_summed_losses(teacher, loss)
    assert from_hidden is not None
    batch = prompt_and_answer_batch()
    count = int((batch.labels[:, 1:] != -100).sum())

    # the reference in float64 throughout: the KD loss on every position's logits (ignored ones count 0)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = base(**inputs).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1]
    labels = batch.labels[:, 1:].reshape(-1)
    total = loss(logits.reshape(-1, 97), teacher_logits.reshape(-1, 97), labels) * (labels != -100).sum()
    ref = grads_of(base, total / count)
    loss_, share = token_loss(base, batch, count, 1, summed_loss, False, fused_head(base), from_hidden)
    ours = grads_of(base, loss_)
    assert share.item() == pytest.approx((total / count).item(), rel=1e-12)
    assert ref.keys() == ours.keys() and ref
    for name, g in ref.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-10, atol=1e-12, msg=name)
