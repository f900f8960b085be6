"""TinyLlama's KV cache: a forward continued from a cache equals the forward over the whole sequence,
and cached generation gives exactly the tokens full recomputation gives (padding, sampling included)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from tests.conftest import assert_as_accurate_as

VOCAB = 40


@pytest.fixture(scope="module")
def model() -> TinyLlamaForCausalLM:
    torch.manual_seed(0)
    m = TinyLlamaForCausalLM(
        TinyLlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=64
        )
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    return m


@pytest.fixture(scope="module")
def model64(model) -> TinyLlamaForCausalLM:
    return copy.deepcopy(model).double()


def test_the_old_call_is_unchanged(model):
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(x, None, x)
    assert out.past_key_values is None and out.logits.shape == (2, 9, VOCAB) and out.loss is not None
    with_cache = model(x, use_cache=True)
    torch.testing.assert_close(with_cache.logits, out.logits, rtol=0, atol=0)
    assert len(with_cache.past_key_values) == 2
    assert with_cache.past_key_values[0][0].shape == (2, 4, 9, 8)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 7),
    split=st.integers(0, 6),
    pad=st.integers(0, 3),
)
def test_forward_continued_from_a_cache_equals_the_whole_forward(model, model64, batch, length, split, pad):
    split = min(split, length - 1)
    g = torch.Generator().manual_seed(batch * 100 + length * 10 + split)
    x = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(x)
    mask[0, : min(pad, length - 1)] = 0
    whole = model(x, attention_mask=mask).logits
    first = model(x[:, :split], attention_mask=mask[:, :split], use_cache=True) if split else None
    rest = model(
        x[:, split:],
        attention_mask=mask,
        past_key_values=first.past_key_values if first else None,
    ).logits
    got = torch.cat([first.logits, rest], 1) if first else rest
    real = mask.bool()  # padded positions' outputs are meaningless either way
    # the cached run sums attention over the cache and the new keys in other groupings: as close to the
    # float64 whole forward as the float32 whole forward is
    whole64 = model64(x, attention_mask=mask).logits
    assert_as_accurate_as("continued", got[real], whole[real], whole64[real])


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    pad=st.integers(0, 4),
    new=st.integers(0, 8),
    sample=st.booleans(),
)
def test_cached_generation_equals_full_recomputation(model, batch, length, pad, new, sample):
    g = torch.Generator().manual_seed(batch * 1000 + length * 100 + pad * 10 + new)
    x = torch.randint(4, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(x)
    mask[-1, : min(pad, length - 1)] = 0
    kw = dict(attention_mask=mask, do_sample=sample, temperature=0.7, top_k=6)
    a = model.generate(x, new, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(x, new, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert a.shape == (batch, length + new)
    assert torch.equal(a, b)
