"""Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT on tiny Llama and GPT-2: same
weights, same outputs (float32, 1e-5), both directions of save/load, and the same generated tokens."""

from __future__ import annotations

import copy

import pytest
import torch

import pyfastpeft as pf
from tests.conftest import assert_as_accurate_as
from tests.tuners.hf_tiny_models import VOCAB, twin_models

peft = pytest.importorskip("peft")

VARIANTS = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=5)),
    "ptuning_mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=5, encoder_hidden_size=24)),
    "ptuning_lstm": (
        "PromptEncoderConfig",
        dict(num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_hidden_size=16),
    ),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=5)),
    "prefix_projection": ("PrefixTuningConfig", dict(num_virtual_tokens=5, prefix_projection=True)),
}
KINDS = ["llama", "gpt2"]


def pair(kind: str, variant: str):
    """(PEFT model, ours) on identical tiny models, with identical (perturbed) prompt encoders."""
    name, kwargs = VARIANTS[variant]
    theirs_base, ours_base = twin_models(kind)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(theirs_base, getattr(peft, name)(task_type="CAUSAL_LM", **kwargs))
    ours = pf.get_peft_model(ours_base, getattr(pf, name)(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.prompt_encoder["default"].parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    state = theirs.prompt_encoder["default"].state_dict()
    ours.prompt_encoder["default"].load_state_dict(state)
    return theirs.eval(), ours.eval()


def inputs(b=3, t=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, mask, labels


def close(ours_out: torch.Tensor, theirs, field: str = "logits", **inputs) -> None:
    """``ours_out`` as accurate as PEFT's float32 ``field`` against PEFT's model run in float64."""
    with torch.no_grad():
        expected = getattr(theirs(**inputs), field)
        ref64 = getattr(copy.deepcopy(theirs).double()(**inputs), field)
    assert_as_accurate_as(field, ours_out.detach(), expected, ref64)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_same_weights_same_outputs(kind, variant):
    theirs, ours = pair(kind, variant)
    ids, mask, labels = inputs()
    a = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape
    close(b.logits, theirs, input_ids=ids, attention_mask=mask, labels=labels)
    close(b.loss, theirs, "loss", input_ids=ids, attention_mask=mask, labels=labels)
    close(ours(input_ids=ids).logits, theirs, input_ids=ids)
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert pf.report(ours).trainable == trainable


def greedy_by_forward(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by recomputing ``model``'s forward on the whole sequence at every step, with the
    position ids transformers' generate gives left-padded rows."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with pytest.warns(UserWarning) if model.active_peft_config.peft_type != "PREFIX_TUNING" else _no_op():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_generation_equals_peft_forward_decoding(kind, variant):
    """generate() (KV cache, virtual tokens in the first step only) gives the tokens greedy decoding
    with PEFT's forward gives. PEFT's own generate cannot be the reference here: with transformers 5
    (which renamed past_key_values to cache) it re-inserts the virtual tokens at every step."""
    theirs, ours = pair(kind, variant)
    ids, mask, _ = inputs(t=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = greedy_by_forward(theirs, ids, mask, 6)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kw), expected)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw), expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_peft_saves_we_load(kind, variant, tmp_path):
    theirs, _ = pair(kind, variant)
    theirs.save_pretrained(tmp_path)
    ids, mask, _ = inputs()
    for is_trainable in (False, True):  # trainable: a reparameterised encoder continues as its table
        _, fresh = twin_models(kind)
        ours = pf.PeftModel.from_pretrained(fresh, tmp_path, is_trainable=is_trainable)
        close(ours(input_ids=ids, attention_mask=mask).logits, theirs, input_ids=ids, attention_mask=mask)
        assert any(p.requires_grad for p in ours.parameters()) == is_trainable


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_we_save_peft_loads(kind, variant, tmp_path):
    _, ours = pair(kind, variant)
    ours.save_pretrained(tmp_path)
    _, fresh = twin_models(kind)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path)
    ids, mask, _ = inputs()
    close(ours(input_ids=ids, attention_mask=mask).logits, theirs, input_ids=ids, attention_mask=mask)
