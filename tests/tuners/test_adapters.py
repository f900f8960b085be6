"""Bottleneck adapters: semantics against a float64 reference, identity at init on the built-in and Hugging
Face models, training, save/load, configs and slot errors, torch.compile, the report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import pyfastpeft as pf
from pyfastpeft.models.data import make_batch
from pyfastpeft.nn import BottleneckAdapter
from pyfastpeft.tuners import AdapterWrapper
from tests.conftest import low_precision_error_bound
from tests.tuners.hf_tiny_models import VOCAB, twin_models
from tests.tuners.test_ia3 import ids, spread, tiny

from .tiny_task import assert_learned, copy_task_losses, held_out_losses

CONFIGS = [("houlsby", "ffn"), ("pfeiffer", "ffn"), ("parallel", "ffn"), ("parallel", "attn")]
ACT64 = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def adapter_reference(h, adapter: BottleneckAdapter):
    """f(h) = up(act(down(h))) in float64."""
    d, u = adapter.adapter_down, adapter.adapter_up
    z = F.linear(h.double(), d.weight.double(), d.bias.double())
    return F.linear(ACT64[adapter.non_linearity](z), u.weight.double(), u.bias.double())


# max |act'(z)| of each activation (gelu's is 1.129 near z = 2.1, silu's 1.0998 near z = 2.4): an error
# in z reaches act(z) scaled by at most this; and |act(z)| ≤ |z| for all four
ACT_LIPSCHITZ = {"relu": 1.0, "gelu": 1.13, "silu": 1.1, "tanh": 1.0}


def adapter_magnitude(h_abs, adapter: BottleneckAdapter):
    """A bound on each element's sum of |terms| in f(h) (h given as a bound on |h|): the down sum on
    absolute values, through the activation's largest slope, then the up sum on absolute values."""
    d, u = adapter.adapter_down, adapter.adapter_up
    z = F.linear(h_abs, d.weight.double().abs(), d.bias.double().abs())
    return F.linear(ACT_LIPSCHITZ[adapter.non_linearity] * z, u.weight.double().abs(), u.bias.double().abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("non_linearity", sorted(ACT64))
@pytest.mark.parametrize("kind", ["serial", "serial-no-residual", "parallel"])
def test_wrapper_matches_float64_reference(device, dtype, non_linearity, kind):
    torch.manual_seed(0)
    base = nn.Linear(19, 13).to(device=device, dtype=dtype)
    d_in = 19 if kind == "parallel" else 13
    adapter = BottleneckAdapter(d_in, 3, 13, non_linearity, init_identity=False, dtype=dtype, device=device)
    wrapper = AdapterWrapper(base)
    wrapper.add("a", adapter, "parallel" if kind == "parallel" else "serial", 0.7, kind != "serial-no-residual")
    wrapper.active_adapters = ["a"]
    x = torch.randn(19, 6, 2, device=device, dtype=dtype).permute(2, 1, 0)  # non-contiguous
    y = wrapper(x)
    y64 = F.linear(x.double(), base.weight.double(), base.bias.double())
    if kind == "parallel":
        ref = y64 + 0.7 * adapter_reference(x, adapter)
    elif kind == "serial":
        ref = y64 + 0.7 * adapter_reference(y64, adapter)
    else:
        ref = 0.7 * adapter_reference(y64, adapter)
    # plain PyTorch in that dtype: the same formula written out; ours may be off by at most twice its
    # error plus two roundings of the sums' absolute terms (low_precision_error_bound)
    yb = base(x)
    src = x if kind == "parallel" else yb
    f = adapter.adapter_up(ACT64[non_linearity](adapter.adapter_down(src)))
    plain = yb + 0.7 * f if kind != "serial-no-residual" else 0.7 * f
    base_abs = F.linear(x.double().abs(), base.weight.double().abs(), base.bias.double().abs())
    f_abs = adapter_magnitude(x.double().abs() if kind == "parallel" else base_abs, adapter)
    magnitude = 0.7 * f_abs + (0 if kind == "serial-no-residual" else base_abs)
    err, bound = low_precision_error_bound(y.detach(), plain.detach(), ref, magnitude=magnitude)
    assert err <= bound, (err, bound)


def test_wrapper_gradcheck_float64():
    torch.manual_seed(0)
    base = nn.Linear(5, 4).double()
    adapter = BottleneckAdapter(4, 2, 4, "tanh", init_identity=False, dtype=torch.float64)
    wrapper = AdapterWrapper(base)
    wrapper.add("a", adapter, "serial", 1.5, True)
    wrapper.active_adapters = ["a"]
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    names = [f"adapters.a.{k}" for k, _ in adapter.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in adapter.parameters())

    def f(x, *values):
        return torch.func.functional_call(wrapper, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *values))


@pytest.mark.parametrize("config,location", CONFIGS)
@pytest.mark.parametrize("kind", ["builtin", "llama", "gpt2", "bert"])
def test_identity_at_init_and_slot_count(kind, config, location):
    base = tiny() if kind == "builtin" else twin_models(kind)[0]
    x = ids(vocab=32 if kind == "builtin" else VOCAB)
    with torch.no_grad():
        before = base(input_ids=x).logits
    model = pf.get_peft_model(base, pf.AdapterConfig(config=config, parallel_location=location))
    wrappers = [m for m in model.modules() if isinstance(m, AdapterWrapper)]
    assert len(wrappers) == (4 if config == "houlsby" else 2)  # two blocks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
    # a non-identity adapter really changes the output
    with torch.no_grad():
        for w in wrappers:
            nn.init.normal_(w.adapters["default"].adapter_up.weight, std=0.5)
        assert (model(input_ids=x).logits - before).abs().max() > 1e-4


@pytest.mark.parametrize("config,location", CONFIGS)
def test_loss_falls_and_only_adapters_change(config, location):
    model = pf.get_peft_model(
        spread(tiny()), pf.AdapterConfig(config=config, parallel_location=location, reduction_factor=4)
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.adapter_" in n for n in trainable)
    held_out = make_batch("copy", 64, 4, 32, torch.Generator().manual_seed(1000))
    before = held_out_losses(model, held_out)
    copy_task_losses(model, lr=2e-2)
    assert_learned(before, held_out_losses(model, held_out))  # see the IA3 test: not a judged 0.9 bar
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trainable[n]), n


@pytest.mark.parametrize("config,location", CONFIGS)
def test_save_load_identical_outputs(config, location, tmp_path):
    cfg = pf.AdapterConfig(
        config=config, parallel_location=location, init_adapter_weights=False, non_linearity="gelu", scaling=0.5
    )
    model = pf.get_peft_model(tiny(), cfg).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["config"] == config and saved["non_linearity"] == "gelu"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    slot = {"houlsby": "self_attn.o_proj", "pfeiffer": "mlp.down_proj"}.get(
        config, "mlp" if location == "ffn" else "self_attn"
    )
    assert f"base_model.model.model.layers.1.{slot}.adapter_up.weight" in keys
    assert len(keys) == 4 * (4 if config == "houlsby" else 2)
    loaded = pf.PeftModel.from_pretrained(tiny(), tmp_path)
    assert type(loaded) is pf.PeftModel and type(loaded.base_model).__name__ == "AdapterModel"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, rtol=0, atol=0)
        with model.disable_adapter():
            assert (model(ids()).logits - loaded(ids()).logits).abs().max() > 1e-4


def test_report_and_unload():
    base = tiny()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = pf.get_peft_model(base, pf.AdapterConfig(config="houlsby", reduction_factor=8))
    r = pf.report(model)
    per = 32 * 4 + 4 + 4 * 32 + 32  # down [4, 32] + bias, up [32, 4] + bias
    assert r.trainable == 4 * per and r.adapter_bytes_on_disk > 0
    plain = model.unload()
    assert not any(isinstance(m, AdapterWrapper) for m in plain.modules())
    assert {n: p for n, p in plain.named_parameters()}.keys() == original.keys()
    with pytest.raises(ValueError, match="cannot be merged"):
        pf.get_peft_model(tiny(), pf.AdapterConfig()).merge_adapter()


def test_compiles_fullgraph():
    model = pf.get_peft_model(tiny(), pf.AdapterConfig(config="houlsby", init_adapter_weights=False))
    x = ids()
    compiled = torch.compile(model.get_base_model(), fullgraph=True, backend="aot_eager")
    with torch.no_grad():  # aot_eager runs the same kernels in the same order: bit-identical
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(config="lora"), "config"),
        (dict(reduction_factor=0), "reduction_factor"),
        (dict(reduction_factor=2.5), "reduction_factor"),
        (dict(non_linearity="swish"), "non_linearity"),
        (dict(scaling=float("nan")), "scaling"),
        (dict(residual="yes"), "residual"),
        (dict(parallel_location="both"), "parallel_location"),
        (dict(ffn_modules=[]), "ffn_modules"),
        (dict(share_across_layers=1), "share_across_layers"),
        (dict(peft_type="LORA"), "peft_type"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        pf.AdapterConfig(**kwargs)


def test_model_without_the_slot_names_near_modules():
    with pytest.raises(ValueError, match=r"ffn_modules.*nearest module names.*down_proj"):
        pf.get_peft_model(tiny(), pf.AdapterConfig(ffn_modules=["down_prj"]))
    unknown = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="ffn_modules.*not an architecture with known adapter slots"):
        pf.get_peft_model(unknown, pf.AdapterConfig())
    # the model is left as it was
    assert all(p.requires_grad for p in unknown.parameters())


def test_override_slots_on_a_custom_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    peft_model = pf.get_peft_model(
        model, pf.AdapterConfig(ffn_modules=["2"], reduction_factor=4, init_adapter_weights=False)
    )
    assert isinstance(model[2], AdapterWrapper) and model[2].adapters["default"].bottleneck == 2
    x = torch.randn(3, 8)
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(x)
        assert (peft_model(x) - base).abs().max() > 0
