"""Prompt tuning, P-tuning and prefix tuning on the built-in TinyLlama: what the virtual tokens compute
(checked against the base model run on real tokens), training, save/load, errors, generation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.models.data import make_batch
from pyfastpeft.nn.prompt_encoders import repeat_to_length
from pyfastpeft.tuners import PromptLearningModel
from tests.conftest import assert_within_rounding, low_precision_error_bound
from tests.tuners.tiny_task import assert_learned, held_out_losses

VOCAB = 40


def tiny(seed: int = 0, **kw) -> TinyLlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=48
    )
    cfg.update(kw)
    model = TinyLlamaForCausalLM(TinyLlamaConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so positions and masks matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    return model


def ids(b=2, t=6, seed=1):
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "prompt": lambda p=4: pf.PromptTuningConfig(num_virtual_tokens=p),
    "ptuning_mlp": lambda p=4: pf.PromptEncoderConfig(num_virtual_tokens=p, encoder_hidden_size=24),
    "ptuning_lstm": lambda p=4: pf.PromptEncoderConfig(
        num_virtual_tokens=p, encoder_reparameterization_type="LSTM", encoder_hidden_size=16
    ),
    "prefix": lambda p=4: pf.PrefixTuningConfig(num_virtual_tokens=p),
    "prefix_projection": lambda p=4: pf.PrefixTuningConfig(
        num_virtual_tokens=p, prefix_projection=True, encoder_hidden_size=24
    ),
}
PROMPT_KINDS = ["prompt", "ptuning_mlp", "ptuning_lstm"]
PREFIX_KINDS = ["prefix", "prefix_projection"]


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.device))


# ---- what the virtual tokens compute ----------------------------------------------------------------
def test_prompt_tuning_equals_the_base_model_on_real_tokens_with_the_same_embeddings():
    """A prompt table holding the embeddings of tokens X makes input Y behave exactly as [X; Y]."""
    base = tiny()
    x, y = ids(1, 4, seed=5), ids(3, 6)
    reference = base(torch.cat([x.expand(3, -1), y], 1)).logits
    model = pf.get_peft_model(base, pf.PromptTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(base.get_input_embeddings()(x[0]))
    out = model(y).logits
    assert out.shape == (3, 4 + 6, VOCAB)  # PEFT returns the virtual positions' logits too
    # the same embeddings through the same computation in the same shapes: bit-identical
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_prefix_tuning_equals_the_base_model_continuing_a_cache(device):
    """A prefix table holding the keys/values of tokens X makes input Y behave exactly as Y after X:
    checks the table's [P, L·2·D] layout, the rotary positions of the real tokens and the mask."""
    x, y = ids(1, 5, seed=5).to(device), ids(3, 6).to(device)
    mask = torch.ones_like(y)
    mask[0, -2:] = 0
    runs = {}
    # Both sides are whole networks computed in different shapes (a cache of keys/values against the
    # full sequence, a padded row against it alone), whose roundings grow through the nonlinearities in
    # a way not computable here. So the comparison runs in float64, and may be off by at most what the
    # float32 run of the plain side is off from its float64 run: a layout, position or mask mistake is
    # off by the whole effect of the prefix, which no rounding reaches.
    for dtype in (torch.float32, torch.float64):
        base = tiny().to(device=device, dtype=dtype)
        full = base(torch.cat([x.expand(3, -1), y], 1)).logits[:, 5:]
        cache = base(x, use_cache=True).past_key_values
        kv = torch.stack([t[0] for layer in cache for t in layer])  # [2L, H, P, hd], k and v per layer
        table = kv.permute(2, 0, 1, 3).reshape(5, -1)
        model = pf.get_peft_model(base, pf.PrefixTuningConfig(num_virtual_tokens=5)).to(dtype)
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(table)
        out = model(y).logits
        assert out.shape == (3, 6, VOCAB) and out.dtype == dtype
        # with an attention mask the padded positions are ignored: a padded row equals it unpadded
        padded = model(y, attention_mask=mask).logits[:1, :4]
        alone = model(y[:1, :4]).logits
        runs[dtype] = (full, out, padded, alone)
    full32, _, _, alone32 = runs[torch.float32]
    full64, out64, padded64, alone64 = runs[torch.float64]
    for name, ours, plain32, ref in (("prefix", out64, full32, full64), ("padded", padded64, alone32, alone64)):
        err, bound = low_precision_error_bound(ours.detach(), plain32.detach(), ref.detach(), factor=1.0)
        assert err <= bound, f"{name}: float64 runs differ by {err:.3g} > float32's own error {bound:.3g}"


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_prompt_methods_extend_mask_and_labels(kind):
    model = pf.get_peft_model(tiny(), CONFIGS[kind]())
    perturb(model)
    y = ids(2, 6)
    mask = torch.ones_like(y)
    mask[1, :2] = 0
    labels = y.clone()
    labels[:, :3] = -100
    out = model(y, attention_mask=mask, labels=labels)
    base = model.get_base_model()
    prompts = model.prompt_table()[None].expand(2, -1, -1)
    embeds = torch.cat([prompts, base.get_input_embeddings()(y)], 1)
    full_mask = torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], 1)
    full_labels = torch.cat([torch.full((2, 4), -100), labels], 1)
    ref = base(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    # the loss covers the real answer tokens only: it equals the cross entropy over them
    logits = out.logits[:, 4:]
    flat, targets = logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    manual = nn.functional.cross_entropy(flat, targets)
    # a mean over the answer tokens of logsumexp − the label's logit, each side rounding its sums over
    # the vocabulary and the tokens
    valid = targets != -100
    terms = (flat.detach().double().logsumexp(-1).abs() + flat.detach().double().abs().amax(-1))[valid].mean()
    assert_within_rounding("loss", out.loss, manual, terms, terms=2 * (VOCAB + int(valid.sum()) + 2), roundings=2)


def test_disable_adapter_runs_the_base_model():
    model = pf.get_peft_model(tiny(), CONFIGS["prefix"]())
    y = ids()
    with model.disable_adapter():
        off = model(y).logits
    torch.testing.assert_close(off, model.get_base_model()(y).logits, rtol=0, atol=0)
    assert not torch.allclose(model(y).logits, off)


# ---- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_task_base() -> TinyLlamaForCausalLM:
    """A base model pretrained on copy and reverse examples mixed, with nothing saying which: a prompt
    can pick the task, so prompt learning has something to learn in a few dozen steps."""
    torch.manual_seed(0)
    base = TinyLlamaForCausalLM(
        TinyLlamaConfig(
            vocab_size=12, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=48
        )
    )
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(100):
        batch = make_batch("copy" if step % 2 else "reverse", 16, 4, 12, gen)
        loss = base(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base.eval()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind", ["prompt", "ptuning_mlp", "prefix", "prefix_projection"])
def test_loss_falls_and_only_the_prompt_trains(kind, seed, two_task_base):
    base = copy.deepcopy(two_task_base)
    torch.manual_seed(seed)  # the prompt's initialisation: not the global state earlier tests left
    model = pf.get_peft_model(base, CONFIGS[kind](6))
    model.train()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("base_model.prompt_encoder.default.") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == pf.report(model).trainable
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    # Progress is judged on one fixed held-out batch, before and after, sequence by sequence: the training
    # batches' own losses swing by ±25 % from batch to batch, which made a mean of five of them a coin toss.
    held_out = make_batch("reverse", 64, 4, 12, torch.Generator().manual_seed(1000 + seed))

    before = held_out_losses(model, held_out)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        batch = make_batch("reverse", 16, 4, 12, gen)
        loss = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_losses(model, held_out)
    # against the held-out batch's own noise, not a judged fraction (which held at 0.33-0.82 of the loss)
    assert_learned(before, after)
    for n, p in base.named_parameters():
        assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


# ---- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("is_trainable", [False, True])
def test_save_load_gives_identical_outputs(kind, is_trainable, tmp_path):
    model = pf.get_peft_model(tiny(), CONFIGS[kind]())
    perturb(model)
    y = ids()
    with torch.no_grad():  # the table is saved as computed without autograd (PyTorch's LSTM rounds its
        expected = model(y).logits  # inference path differently from its training path)
    model.save_pretrained(tmp_path)
    loaded = pf.PeftModel.from_pretrained(tiny(), tmp_path, is_trainable=is_trainable)
    assert isinstance(loaded, pf.PeftModel) and isinstance(loaded.base_model, PromptLearningModel)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    with torch.no_grad():  # the saved table through the same computation: bit-identical
        torch.testing.assert_close(loaded(y).logits, expected, rtol=0, atol=0)
    trains = [p for p in loaded.parameters() if p.requires_grad]
    assert bool(trains) == is_trainable
    # saved again, the file is the same table
    loaded.save_pretrained(tmp_path / "again")
    a = pf.io.adapter_files.read_adapter(tmp_path)[1]["prompt_embeddings"]
    b = pf.io.adapter_files.read_adapter(tmp_path / "again")[1]["prompt_embeddings"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_named_adapters_load_and_switch(tmp_path):
    first = pf.get_peft_model(tiny(), CONFIGS["prompt"]())
    perturb(first, seed=1)
    second = pf.get_peft_model(tiny(), CONFIGS["prompt"](6))
    perturb(second, seed=2)
    second.save_pretrained(tmp_path)
    y = ids()
    first.load_adapter(tmp_path, "other")
    out_first = first(y).logits
    first.set_adapter("other")
    torch.testing.assert_close(first(y).logits, second(y).logits, rtol=0, atol=0)  # the same tensors: exact
    first.set_adapter("default")
    torch.testing.assert_close(first(y).logits, out_first, rtol=0, atol=0)
    first.delete_adapter("other")
    assert list(first.prompt_encoder) == ["default"]


def test_saved_layout_is_peft_s(tmp_path):
    model = pf.get_peft_model(tiny(), CONFIGS["prefix"](3))
    model.save_pretrained(tmp_path)
    raw, tensors, _ = pf.io.read_adapter(tmp_path)
    config = pf.tuners.config_from_dict(raw)
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (3, 2 * 2 * 32)  # [P, layers · 2 · hidden]
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 32, 4)
    assert config.peft_type == "PREFIX_TUNING" and config.task_type == "CAUSAL_LM"


# ---- init -------------------------------------------------------------------------------------------
def test_text_init_repeats_or_truncates_as_peft():
    assert repeat_to_length([5, 6, 7], 7) == [5, 6, 7, 5, 6, 7, 5]
    assert repeat_to_length([5, 6, 7, 8, 9], 3) == [5, 6, 7]
    base = tiny()
    for token_ids, expected in (([5, 6], [5, 6, 5, 6, 5]), ([9, 8, 7, 6, 5, 4, 3], [9, 8, 7, 6, 5])):
        cfg = pf.PromptTuningConfig(
            num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=token_ids
        )
        model = pf.get_peft_model(tiny(), cfg)
        want = base.get_input_embeddings().weight[expected]
        torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, want, rtol=0, atol=0)


def test_sample_vocab_init_uses_vocabulary_embeddings():
    model = pf.get_peft_model(tiny(), pf.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = model.get_base_model().get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert any(torch.equal(row, v) for v in vocab)


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, field",
    [
        (pf.PromptTuningConfig(), "num_virtual_tokens"),
        (pf.PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
        (pf.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init"),
        (pf.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "tokenizer_name_or_path"),
        (
            pf.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="t"),
            "prompt_tuning_init_text",
        ),
        (
            pf.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=[]),
            "prompt_tuning_init_token_ids",
        ),
        (
            pf.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU"),
            "encoder_reparameterization_type",
        ),
        (pf.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.5), "encoder_dropout"),
        (pf.PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size"),
        (pf.PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones"), "init_weights"),
        (pf.PrefixTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION"), "task_type"),
        (pf.PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2), "num_transformer_submodules"),
        (pf.PrefixTuningConfig(num_virtual_tokens=2, modules_to_save="lm_head"), "modules_to_save"),
    ],
)
def test_bad_configs_name_the_field(config, field):
    base = tiny()
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=field):
        pf.get_peft_model(base, config)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_more_virtual_tokens_than_the_context_allows(kind):
    with pytest.raises(ValueError, match="num_virtual_tokens.*max_position_embeddings"):
        pf.get_peft_model(tiny(), CONFIGS[kind](48))
    model = pf.get_peft_model(tiny(), CONFIGS[kind](40))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids(1, 9))  # 40 + 9 positions


def test_init_token_ids_out_of_range():
    cfg = pf.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=[99])
    with pytest.raises(ValueError, match="prompt_tuning_init_token_ids"):
        pf.get_peft_model(tiny(), cfg)


class NoEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, input_ids=None, attention_mask=None):
        return self.linear(input_ids)


class NoCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        return self.embed(input_ids)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_model_without_input_embeddings(kind):
    with pytest.raises(ValueError, match="no input embeddings"):
        pf.get_peft_model(NoEmbeddings(), CONFIGS[kind]())


def test_prefix_tuning_needs_attention_that_takes_a_cache():
    cfg = pf.PrefixTuningConfig(num_virtual_tokens=2, token_dim=8, num_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="past_key_values"):
        pf.get_peft_model(NoCache(), cfg)


def test_configs_round_trip_through_dicts():
    for make in CONFIGS.values():
        cfg = make()
        again = pf.tuners.config_from_dict(cfg.to_dict())
        assert type(again) is type(cfg) and again == cfg
    peft_json = {
        "peft_type": "P_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 3,
        "encoder_reparameterization_type": "LSTM",
        "auto_mapping": None,
        "peft_version": "0.21.2",
    }
    cfg = pf.tuners.config_from_dict(peft_json)
    assert isinstance(cfg, pf.PromptEncoderConfig) and cfg.encoder_reparameterization_type == "LSTM"


# ---- generation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [None, *CONFIGS])
def test_kv_cache_generation_equals_full_recomputation(kind, device):
    model = tiny().to(device)
    if kind is not None:
        model = pf.get_peft_model(model, CONFIGS[kind]())
        perturb(model)
    y = ids(3, 5).to(device)
    mask = torch.ones_like(y)
    mask[0, :2] = 0  # left padding
    cached = model.generate(y, max_new_tokens=8, attention_mask=mask)
    recomputed = model.generate(y, max_new_tokens=8, attention_mask=mask, use_cache=False)
    assert cached.shape == (3, 13) and torch.equal(cached[:, :5], y)
    assert torch.equal(cached, recomputed)
    # left padding does not change a row's tokens
    alone = model.generate(y[:1, 2:], max_new_tokens=8)
    assert torch.equal(alone[:, 3:], cached[:1, 5:])
    g1, g2 = (torch.Generator(device).manual_seed(7) for _ in range(2))
    sampled = model.generate(y, 6, mask, do_sample=True, temperature=0.8, top_k=5, generator=g1)
    again = model.generate(y, 6, mask, do_sample=True, temperature=0.8, top_k=5, generator=g2, use_cache=False)
    assert torch.equal(sampled, again)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_greedy_generation_follows_the_forward_argmax(kind):
    model = pf.get_peft_model(tiny(), CONFIGS[kind]())
    perturb(model)
    seq = ids(2, 5)
    out = model.generate(seq, max_new_tokens=6)
    for _ in range(6):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_generate_checks_its_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids(2, 5), 3, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids(2, 5), 3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids(2, 5), 3, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids(2, 5), past_key_values=((torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8)),))
    eos = int(model.generate(ids(2, 5), 1)[0, -1])
    out = model.generate(ids(2, 5), 30, eos_token_id=eos, pad_token_id=0)
    assert out[0, 5] == eos and (out[0, 6:] == 0).all()  # a finished row continues with padding
    both = model.generate(ids(1, 5), 30, eos_token_id=eos)
    assert both.shape == (1, 6)  # every row finished: generation stops


# ---- the command line's routing -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_routed_base_calls_add_the_virtual_tokens(kind):
    from pyfastpeft.train.methods import METHODS

    args = type("Args", (), {"num_virtual_tokens": 4, "encoder_hidden_size": None})()
    base = tiny()
    model = METHODS[kind](base, args)
    perturb(model)
    y = ids()
    expected = model(y).logits
    routed = base(y).logits  # what a training loop holding the base model sees
    assert routed.shape == (2, 6, VOCAB)
    torch.testing.assert_close(routed, expected[:, -6:], rtol=0, atol=0)
    names = {n for n, p in base.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("prompt_encoder.default.") for n in names)
    # the PEFT model's own generate still adds the virtual tokens once
    assert torch.equal(model.generate(y, 5), model.generate(y, 5, use_cache=False))
    with model.disable_adapter():
        torch.testing.assert_close(base(y).logits, tiny()(y).logits, rtol=0, atol=0)
