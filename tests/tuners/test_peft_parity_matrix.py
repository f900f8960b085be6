"""Hugging Face PEFT parity on 17 tiny architectures × every method PEFT supports for each: the defaults
PEFT resolves (target, feed-forward and saved modules: the same file keys and shapes), the task head,
both load directions (PEFT saves → we load, we save → PEFT loads: the same outputs, float32, 1e-5) and,
for the methods that merge, merged outputs equal to unmerged ones (float64)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

import pyfastpeft as pf
from tests.conftest import low_precision_error_bound
from tests.tuners.tiny_archs import ARCHS, inputs, logits, twins

peft = pytest.importorskip("peft")

MERGEABLE = ("lora", "dora", "ia3")
# Explicit targets where PEFT's table has no default for the model type (PEFT then requires them too).
NO_DEFAULT_TARGETS = {
    "phi3": (["qkv_proj"], ["qkv_proj", "down_proj"], ["down_proj"]),
    "distilbert": (["q_lin", "v_lin"], ["k_lin", "v_lin", "lin2"], ["lin2"]),
    "vit": (["q_proj", "v_proj"], ["k_proj", "v_proj", "fc2"], ["fc2"]),
}
# PEFT's prefixes run on Falcon from transformers 5.25 on: with 5.24.0 PEFT 0.21.2 failed on them, with
# 5.25.0 it runs and its outputs match ours (the matrix's tests then include the pair).
FALCON_PREFIX_IN_PEFT = Version(transformers.__version__) >= Version("5.25")
# (architecture, method) pairs PEFT 0.21 itself cannot run with the installed transformers, with the reason.
UNSUPPORTED_BY_PEFT = {
    **{(a, "prefix"): "the model's forward takes no past_key_values" for a in ("bert", "roberta", "deberta-v2")},
    ("distilbert", "prefix"): "the model's forward takes no past_key_values",
    **(
        {}
        if FALCON_PREFIX_IN_PEFT
        else {("falcon", "prefix"): "multi-query attention: PEFT's prefixes have the wrong number of key/value heads"}
    ),
    **{("vit", m): "no word embeddings / no task type for images" for m in ("prompt", "ptuning", "prefix")},
}
METHODS = ("lora", "dora", "ia3", "prompt", "ptuning", "prefix")
PAIRS = [(a, m) for a in ARCHS for m in METHODS if (a, m) not in UNSUPPORTED_BY_PEFT]


def config_kwargs(arch: str, method: str) -> dict:
    """The same keyword arguments for PEFT's config class and ours: PEFT's defaults wherever PEFT has
    them (no target_modules), random initialisation so the adapter is not the identity."""
    a = ARCHS[arch]
    kw: dict = {"task_type": a.task_type or None}
    explicit = NO_DEFAULT_TARGETS.get(arch)
    if method in ("lora", "dora"):
        kw.update(r=4, lora_alpha=8, init_lora_weights=False, use_dora=method == "dora")
        if explicit:
            kw["target_modules"] = explicit[0]
    elif method == "ia3":
        kw["init_ia3_weights"] = False
        if explicit:
            kw.update(target_modules=explicit[1], feedforward_modules=explicit[2])
    else:
        kw["num_virtual_tokens"] = 3
        if method == "ptuning":
            kw["encoder_hidden_size"] = 16
        if arch == "distilbert":  # its config says "dim" and "n_heads", which PEFT does not read
            kw.update(token_dim=32, num_attention_heads=4)
    if a.is_vision:
        kw["modules_to_save"] = ["classifier"]  # no task type for images: the head is named, as PEFT's docs do
    return kw


CLASSES = {
    "lora": "LoraConfig",
    "dora": "LoraConfig",
    "ia3": "IA3Config",
    "prompt": "PromptTuningConfig",
    "ptuning": "PromptEncoderConfig",
    "prefix": "PrefixTuningConfig",
}


def make(lib, base, arch: str, method: str):
    return lib.get_peft_model(base, getattr(lib, CLASSES[method])(**config_kwargs(arch, method)))


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Make every trainable tensor non-trivial (magnitudes, prompt tables, head copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif "lora_" not in name and "ia3_l" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Two libraries' float32 runs of the same function on a left-padded batch. The float64 rule of
    # hf_tiny_models.assert_same_as (which bounds each side by the other's own float32 error) cannot serve
    # here: Bloom's float64 attention turns a left-padded row into NaN, real positions included. So this
    # is the one comparison left at a fixed tolerance: 1e-5, about 100 float32 roundings at these logits'
    # size (|logit| < 10), far below any layout, scaling or key error (those move the output by the
    # adapter's whole effect, which changed() requires to exceed 1e-3).
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def changed(model, batch, out: torch.Tensor) -> None:
    """The adapter changes the output, or a comparison would prove nothing."""
    with model.disable_adapter():
        base = logits(model, batch)
    if base.shape == out.shape:
        assert (base - out).abs().max() > 1e-3


def file_layout(directory) -> dict:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("arch,method", PAIRS)
def test_defaults_and_heads_match_peft(arch, method, tmp_path):
    theirs_base, ours_base = twins(arch)
    theirs = make(peft, theirs_base, arch, method)
    ours = make(pf, ours_base, arch, method)
    tc, oc = theirs.peft_config["default"], ours.peft_config["default"]
    for field in ("target_modules", "feedforward_modules", "num_layers", "token_dim", "num_attention_heads"):
        if hasattr(tc, field):
            t, o = getattr(tc, field), getattr(oc, field)
            assert (sorted(t) if isinstance(t, (set, list)) else t) == (sorted(o) if isinstance(o, list) else o), field
    assert set(tc.modules_to_save or ()) == set(oc.modules_to_save or ())
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours.save_pretrained(tmp_path / "ours")
    assert file_layout(tmp_path / "ours") == file_layout(tmp_path / "theirs")
    trainable = {n: p.numel() for n, p in theirs.named_parameters() if p.requires_grad}
    assert pf.report(ours).trainable == sum(trainable.values())
    if ARCHS[arch].head:  # the head trains, as a copy, with every method
        assert any(ARCHS[arch].head in n and ".modules_to_save." in n for n in trainable)


@pytest.mark.parametrize("arch,method", PAIRS)
def test_peft_saves_we_load(arch, method, tmp_path):
    theirs_base, ours_base = twins(arch)
    batch = inputs(arch)
    torch.manual_seed(2)
    theirs = make(peft, theirs_base, arch, method)
    perturb(theirs, 3)
    theirs.eval().save_pretrained(str(tmp_path))
    expected = logits(theirs, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own files load without complaint
        ours = pf.PeftModel.from_pretrained(ours_base, tmp_path)
    out = logits(ours, batch)
    close(out, expected)
    changed(ours, batch, out)


@pytest.mark.parametrize("arch,method", PAIRS)
def test_we_save_peft_loads(arch, method, tmp_path):
    theirs_base, ours_base = twins(arch)
    batch = inputs(arch)
    torch.manual_seed(4)
    ours = make(pf, ours_base, arch, method)
    perturb(ours, 5)
    ours.eval().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == (ARCHS[arch].task_type or None)
    out = logits(ours, batch)
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path)).eval()
    close(logits(theirs, batch), out)
    changed(ours, batch, out)


@pytest.mark.parametrize("arch,method", [(a, m) for a, m in PAIRS if m in MERGEABLE])
def test_merge_gives_the_unmerged_output(arch, method):
    _, base = twins(arch)
    # no padding here: fully masked rows give NaN in some float64 attention paths (Bloom's)
    batch = {
        k: v.double() if v.is_floating_point() else torch.ones_like(v) if k == "attention_mask" else v
        for k, v in inputs(arch).items()
    }
    torch.manual_seed(6)
    ours = make(pf, base.double(), arch, method)
    perturb(ours, 7)
    ours.eval()
    unmerged = logits(ours, batch)
    # float64 has no wider reference: the float32 run of the same network measures how far roundings
    # move its output, and float64's move that much scaled by the ratio of the two epsilons
    batch32 = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    unmerged32 = logits(copy.deepcopy(ours).float(), batch32)
    ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    ours.merge_adapter()
    merged = logits(ours, batch)
    # the merged weights are rounded once more than the unmerged path's: twice the float32 run's error
    # (scaled), plus two roundings at the outputs' size
    _, bound = low_precision_error_bound(merged, unmerged32, unmerged, factor=2 * ratio)
    err = (merged - unmerged).abs().max().item()
    assert err <= bound, f"merged: {err:.3g} off the unmerged float64 output > {bound:.3g}"
    ours.unmerge_adapter()
    err = (logits(ours, batch) - unmerged).abs().max().item()
    assert err <= bound, f"unmerged again: {err:.3g} off the unmerged float64 output > {bound:.3g}"
    changed(ours, batch, unmerged)


@pytest.mark.parametrize("arch,method", sorted(UNSUPPORTED_BY_PEFT))
def test_unsupported_pairs_fail_in_peft_too(arch, method):
    """The pairs left out of the matrix are ones PEFT itself cannot run (so the list stays honest)."""
    base, _ = twins(arch)
    with pytest.raises(Exception):  # noqa: B017  (PEFT raises ValueError, KeyError or RuntimeError)
        logits(make(peft, base, arch, method).eval(), inputs(arch))


@pytest.mark.parametrize("arch", sorted(NO_DEFAULT_TARGETS))
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_no_default_targets_is_an_error_like_peft(arch, method):
    cls = CLASSES[method]
    kw = {k: v for k, v in config_kwargs(arch, method).items() if k not in ("target_modules", "feedforward_modules")}
    with pytest.raises(ValueError):
        peft.get_peft_model(twins(arch)[0], getattr(peft, cls)(**kw))
    with pytest.raises(ValueError, match="target_modules: required"):
        pf.get_peft_model(twins(arch)[0], getattr(pf, cls)(**kw))
