"""Tiny random-init transformers models (no downloads) shared by the compatibility tests.

Importing this module needs nothing beyond pytest and torch: each builder skips its test when transformers
is missing, so a test file can import the builders and still run its tests on the built-in model."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import assert_as_accurate_as, low_precision_error_bound

VOCAB = 50


def _transformers():
    return pytest.importorskip("transformers")


def llama_config(**fields):
    """A small ``transformers.LlamaConfig``: hidden 32 in 4 heads with 2 key/value heads, 2 layers, a
    vocabulary of VOCAB, 64 positions; ``fields`` set anything else (vocab_size, intermediate_size, ...)."""
    transformers = _transformers()
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**shape, **fields})


def tiny_llama():
    return _transformers().LlamaForCausalLM(llama_config())


def tiny_gpt2():
    transformers = _transformers()
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert():
    transformers = _transformers()
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def twin_models(kind: str, seed: int = 0):
    """Two identical copies of a tiny model, in eval mode."""
    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    return model, copy.deepcopy(model)


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def assert_same_as(ours, theirs, ids) -> None:
    """Our model computes PEFT's function: in float64 (copies of both), ours is as close to PEFT as PEFT's
    own float32 run is to its float64 run (a wrong scaling, layout or key is off by the adapter's whole
    effect, no rounding); and in float32, ours is as accurate against that float64 run as PEFT's float32
    run (assert_as_accurate_as). Comparing the two float32 runs with each other would need a bound on
    how both orders' roundings grow through the network, which is not computable here."""
    with torch.no_grad():
        ours32, theirs32 = outputs(ours, ids), outputs(theirs, ids)
        ours64 = outputs(copy.deepcopy(ours).double(), ids)
        theirs64 = outputs(copy.deepcopy(theirs).double(), ids)
    err, bound = low_precision_error_bound(ours64, theirs32, theirs64, factor=1.0)
    assert err <= bound, f"float64: ours off PEFT by {err:.3g} > PEFT's float32 error {bound:.3g}"
    assert_as_accurate_as("float32 outputs", ours32, theirs32, theirs64)
