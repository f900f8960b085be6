"""Task heads (pyfastpeft.heads): pooling, losses, training with every kind of PEFT method, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import pyfastpeft as pf
from pyfastpeft.heads import ClassificationHead, RegressionHead, TaskModel, TokenClassificationHead
from pyfastpeft.models.data import FIRST_SYMBOL, make_batch
from tests.conftest import assert_within_rounding
from tests.tuners.tiny_task import VOCAB, pretrained_tiny, snapshot, tiny_llama

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def labelled(seed: int, size: int = 32):
    """A built-in classification task: are most of the 5 symbols of a ``reverse`` sequence in the upper
    half of the alphabet?"""
    b = make_batch("reverse", size, 5, VOCAB, torch.Generator().manual_seed(seed))
    upper = b.input_ids[:, 1:6] >= FIRST_SYMBOL + (VOCAB - FIRST_SYMBOL) // 2
    return b.input_ids, b.attention_mask, (upper.sum(1) > 2).long()


@torch.no_grad()
def held_out_losses(model) -> torch.Tensor:
    """Per-example cross-entropy (float64) on the held-out set."""
    ids, mask, labels = labelled(10_000, size=256)
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.double(), labels, reduction="none")


def assert_learned(before: torch.Tensor, after: torch.Tensor) -> None:
    """The trained head beats both the untrained model and the best input-blind guess (the entropy of the
    held-out labels), each by more than three standard errors of the mean over the 256 examples (the
    paired difference for the untrained model): a margin from the held-out set's own noise, so a run
    that learned nothing fails at any seed, and one that learned does not depend on a judged fraction."""
    n = after.numel()
    _, _, labels = labelled(10_000, size=256)
    prior = torch.bincount(labels, minlength=2).double() / n
    chance = -(prior * prior.clamp_min(1e-300).log()).sum().item()
    gain = before - after
    assert gain.mean() > 3 * gain.std() / n**0.5, (before.mean().item(), after.mean().item())
    assert after.mean() < chance - 3 * after.std() / n**0.5, (after.mean().item(), chance)


def train_head(model, steps: int = 60, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids, mask, labels = labelled(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- pooling and losses against plain PyTorch --------------------------------------------------------
def hidden(model: TaskModel, ids, mask):
    return model.hidden_states(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_pooling_with_padding(pooling):
    m = pf.with_task_head(tiny_llama(), "classification", 3, pooling=pooling).eval()
    ids = torch.randint(FIRST_SYMBOL, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    h = hidden(m, ids, mask)
    if pooling == "last":
        pooled = torch.stack([h[0, 4], h[1, 6], h[2, 6]])
    elif pooling == "mean":
        pooled = torch.stack([h[0, :5].mean(0), h[1, 2:].mean(0), h[2].mean(0)])
    else:
        pooled = h[:, 0]
    out = m(input_ids=ids, attention_mask=mask)
    if pooling == "mean":
        # the head sums the masked rows in its own order: against float64 means of the same hidden states,
        # a sum over the tokens, one over the features (and the bias); pooled and logits rounded to float32
        w, b = (t.detach().double() for t in (m.score.out_proj.weight, m.score.out_proj.bias))
        h64 = h.detach().double()
        rows = [h64[0, :5], h64[1, 2:], h64[2]]
        expected = torch.stack([r.mean(0) for r in rows]) @ w.t() + b
        magnitude = torch.stack([r.abs().mean(0) for r in rows]) @ w.abs().t() + b.abs()
        assert_within_rounding("logits", out.logits, expected, magnitude, terms=7 + h.shape[-1] + 2, roundings=2)
    else:  # the same rows through the same layer
        torch.testing.assert_close(out.logits, m.score.out_proj(pooled), rtol=0, atol=0)
    assert out.loss is None


def test_hidden_states_are_the_backbones_last_normed_states():
    base = tiny_llama()
    m = pf.with_task_head(base, "classification", 2)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    h = hidden(m, ids, None)
    torch.testing.assert_close(base.lm_head(h), base(input_ids=ids).logits, rtol=0, atol=0)  # the same layer


def test_losses():
    ids = torch.randint(FIRST_SYMBOL, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    cls = pf.with_task_head(tiny_llama(), "classification", 3)
    labels = torch.tensor([0, 2, 1, 2])
    out = cls(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels), rtol=0, atol=0)
    reg = pf.with_task_head(tiny_llama(), "regression", 1, pooling="mean")
    target = torch.randn(4)
    out = reg(input_ids=ids, labels=target)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], target), rtol=0, atol=0)
    tok = pf.with_task_head(tiny_llama(), "token_classification", 5)
    tags = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(3))
    tags[:, :2] = -100
    out = tok(input_ids=ids, labels=tags)
    assert out.logits.shape == (4, 6, 5)
    # the head averages over every unmasked position in its own order: against the float64 loss, within
    # the roundings of a log-sum-exp over the 5 classes and a mean over the rows, at their absolute terms
    logits64, kept = out.logits[:, 2:].reshape(-1, 5).detach().double(), tags[:, 2:].reshape(-1)
    ref = F.cross_entropy(logits64, kept)
    terms = (torch.logsumexp(logits64, -1).abs() + logits64.abs().amax(-1)).mean()
    assert_within_rounding("loss", out.loss, ref, terms, terms=5 + kept.numel() + 2, roundings=2)
    assert isinstance(cls.score, ClassificationHead) and isinstance(reg.score, RegressionHead)
    assert isinstance(tok.score, TokenClassificationHead)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "ranking"}, "^kind"),
        ({"pooling": "max"}, "^pooling"),
        ({"num_labels": 0}, "^num_labels"),
        ({"dropout": 1.0}, "^dropout"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"kind": "classification", "num_labels": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pf.with_task_head(tiny_llama(), **args)


def test_bad_labels_and_backbones():
    m = pf.with_task_head(tiny_llama(), "classification", 2)
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="labels: expected shape \\[2\\]"):
        m(input_ids=ids, labels=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="backbone"):
        pf.with_task_head(torch.nn.Linear(4, 4), "classification", 2, hidden_size=4)


# ---- training with PEFT methods ---------------------------------------------------------------------
CONFIGS = {
    "lora": lambda: pf.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, modules_to_save=["score"]),
    "bitfit": lambda: pf.BitFitConfig(),
    "freeze": lambda: pf.LayerFreezeConfig(last_layers=1),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_head_trains_and_is_saved_with_every_method(method, seed, tmp_path):
    backbone = pretrained_tiny()  # built (and cached) before seeding: its first call draws from the global RNG
    torch.manual_seed(seed)  # the head's and LoRA's initialisation: the test does not depend on test order
    task = pf.with_task_head(backbone, "classification", 2, pooling="mean")
    m = pf.get_peft_model(task, CONFIGS[method]())
    head = {n for n, p in m.named_parameters() if p.requires_grad and ".score." in n}
    assert head, "the head must train"
    before = snapshot(m)
    losses_before = held_out_losses(m)
    train_head(m)
    assert_learned(losses_before, held_out_losses(m))
    now = dict(m.named_parameters())
    assert all(not torch.equal(now[n], before[n]) for n in head)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert all(torch.equal(now[n], before[n]) for n in frozen)
    ids, mask, _ = labelled(1000)
    m.eval()
    expected = m(input_ids=ids, attention_mask=mask).logits
    m.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.score.out_proj.weight", "base_model.model.score.out_proj.bias"} <= keys
    fresh = pf.with_task_head(pretrained_tiny(), "classification", 2, pooling="mean")
    loaded = pf.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    r = pf.report(m)
    assert r.changed_entries >= sum(now[n].numel() for n in head) - 2  # the head's copy differs from its original


def test_tuner_head_disable_and_unload():
    task = pf.with_task_head(tiny_llama(), "classification", 2)
    ids, mask, _ = labelled(5, size=4)
    original = task(input_ids=ids, attention_mask=mask).logits
    m = pf.get_peft_model(task, pf.LayerFreezeConfig(last_layers=1))
    train_head(m, steps=2)
    trained = m(input_ids=ids, attention_mask=mask).logits
    with m.disable_adapter():
        assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, original)
    plain = m.merge_and_unload()
    assert isinstance(plain.score, ClassificationHead)
    assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, trained)


# ---- Hugging Face backbones -------------------------------------------------------------------------
def test_on_hugging_face_backbones(tmp_path):
    pytest.importorskip("transformers")
    from tests.tuners.hf_tiny_models import tiny_bert
    from tests.tuners.hf_tiny_models import tiny_llama as hf_llama

    torch.manual_seed(0)
    bert = tiny_bert().bert.eval()  # the bare encoder, no dropout
    m = pf.with_task_head(bert, "classification", 3, pooling="cls")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    h = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(m(input_ids=ids).logits, m.score(h[:, 0]), rtol=0, atol=0)
    torch.manual_seed(1)
    tagger = pf.with_task_head(hf_llama(), "token_classification", 4)
    peft = pf.get_peft_model(tagger, pf.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
    tags = torch.randint(0, 4, (2, 7))
    out = peft(input_ids=ids, labels=tags)
    assert out.logits.shape == (2, 7, 4)
    out.loss.backward()
    assert peft.base_model.model.score.modules_to_save["default"].out_proj.weight.grad is not None
    peft.save_pretrained(tmp_path)
    torch.manual_seed(1)  # the same base model and (discarded) head initialisation
    again = pf.PeftModel.from_pretrained(pf.with_task_head(hf_llama(), "token_classification", 4), tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=0, atol=0)
