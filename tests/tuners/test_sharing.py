"""Parameter sharing: one bottleneck adapter for every layer, LoRA with A (and B) tied across layers, and
one base model serving several task adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pyfastpeft as pf
from pyfastpeft.models.data import make_batch
from pyfastpeft.tuners import AdapterWrapper, LoraLinear
from tests.conftest import assert_within_rounding
from tests.tuners.test_ia3 import ids, spread, tiny

from .tiny_task import assert_learned, copy_task_losses, held_out_losses

QV = ["q_proj", "v_proj"]


# ---- one bottleneck adapter shared by every layer ------------------------------------------------------
def test_shared_adapter_is_one_module_and_trains():
    model = pf.get_peft_model(
        spread(tiny()), pf.AdapterConfig(config="houlsby", share_across_layers=True, reduction_factor=4)
    )
    wrappers = {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, AdapterWrapper)}
    attn = {id(m.adapters["default"]) for p, m in wrappers.items() if p.endswith("o_proj")}
    ffn = {id(m.adapters["default"]) for p, m in wrappers.items() if p.endswith("down_proj")}
    assert len(wrappers) == 4 and len(attn) == 1 and len(ffn) == 1 and attn != ffn
    per = 32 * 8 + 8 + 8 * 32 + 32
    assert model.get_nb_trainable_parameters()[0] == 2 * per  # counted once, not once per layer
    assert pf.report(model).trainable == 2 * per
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    held_out = make_batch("copy", 64, 4, 32, torch.Generator().manual_seed(1000))
    before = held_out_losses(model, held_out)
    copy_task_losses(model, lr=2e-2)
    assert_learned(before, held_out_losses(model, held_out))  # against its noise, not a judged 0.9
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def assert_sum_of(name: str, total: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """``total`` is the sum of ``parts`` (the same forward, so each layer's contribution is the one the
    untied copy computes), accumulated in any order: within len(parts) roundings of Σ|part|."""
    exact = torch.stack([p.double() for p in parts]).sum(0)
    magnitude = torch.stack([p.double().abs() for p in parts]).sum(0)
    assert_within_rounding(name, total, exact, magnitude, terms=len(parts))


def test_shared_adapter_gradient_is_the_sum_over_layers():
    torch.manual_seed(0)
    shared = pf.get_peft_model(tiny(), pf.AdapterConfig(share_across_layers=True, init_adapter_weights=False))
    separate = pf.get_peft_model(tiny(), pf.AdapterConfig(init_adapter_weights=False))
    one = next(m for m in shared.modules() if isinstance(m, AdapterWrapper)).adapters["default"]
    per_layer = [m.adapters["default"] for m in separate.modules() if isinstance(m, AdapterWrapper)]
    with torch.no_grad():
        for a in per_layer:
            a.load_state_dict(one.state_dict())
    x = ids()
    shared(x, labels=x).loss.backward()
    separate(x, labels=x).loss.backward()
    for name, p in one.named_parameters():
        assert_sum_of(name, p.grad, [dict(a.named_parameters())[name].grad for a in per_layer])


def test_shared_adapter_saves_once_and_loads(tmp_path):
    model = pf.get_peft_model(
        tiny(), pf.AdapterConfig(config="houlsby", share_across_layers=True, init_adapter_weights=False)
    ).eval()
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(
        f"base_model.model.shared_adapter.{slot}.adapter_{side}.{t}"
        for slot in ("attn", "ffn")
        for side in ("down", "up")
        for t in ("weight", "bias")
    )
    loaded = pf.PeftModel.from_pretrained(tiny(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, rtol=0, atol=0)


class Uneven(nn.Module):
    """Two blocks whose feed-forward output projections differ in width."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for block, width in zip(self.layers, (8, 12), strict=True):
            block.mlp = nn.Module()
            block.mlp.down_proj = nn.Linear(8, width)

    def forward(self, x):
        return [block.mlp.down_proj(x) for block in self.layers]


def test_shared_adapter_with_differing_shapes_names_the_layers():
    with pytest.raises(
        ValueError, match=r"share_across_layers.*layers\.0\.mlp\.down_proj: 8->8.*layers\.1\.mlp\.down_proj: 12->12"
    ):
        pf.get_peft_model(Uneven(), pf.AdapterConfig(share_across_layers=True))
    pf.get_peft_model(Uneven(), pf.AdapterConfig())  # unshared: each layer its own size


# ---- LoRA with A tied across layers --------------------------------------------------------------------
def tied(**kw) -> pf.PeftModel:
    return pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=QV, r=4, init_lora_weights=False, **kw))


def lora_layers(model) -> dict[str, LoraLinear]:
    return {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, LoraLinear)}


def test_tied_a_is_one_parameter_per_module_name_and_b_per_layer():
    model = tied(tie_lora_A=True)
    layers = lora_layers(model)
    for name in QV:
        group = [m for p, m in layers.items() if p.endswith(name)]
        assert len(group) == 2
        assert group[0].lora_A["default"].weight is group[1].lora_A["default"].weight
        assert group[0].lora_B["default"].weight is not group[1].lora_B["default"].weight
    a, b = 4 * 32, 32 * 4
    assert model.get_nb_trainable_parameters()[0] == 2 * a + 4 * b  # one A per name, one B per layer
    assert pf.report(model).trainable == 2 * a + 4 * b


def test_tied_a_gradient_accumulates_over_layers():
    model = tied(tie_lora_A=True)
    untied = tied()
    layers, free = lora_layers(model), lora_layers(untied)
    with torch.no_grad():
        for path, layer in layers.items():
            free[path].lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            free[path].lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, untied(x).logits, rtol=0, atol=0)
    model(x, labels=x).loss.backward()
    untied(x, labels=x).loss.backward()
    for name in QV:
        shared = next(m for p, m in layers.items() if p.endswith(name)).lora_A["default"].weight.grad
        assert_sum_of(name, shared, [m.lora_A["default"].weight.grad for p, m in free.items() if p.endswith(name)])
    for path, layer in layers.items():
        # the same forward (exact above) and the same backward up to B
        torch.testing.assert_close(
            layer.lora_B["default"].weight.grad, free[path].lora_B["default"].weight.grad, rtol=0, atol=0
        )


def test_tied_lora_saves_once_loads_and_refuses_peft_layout(tmp_path):
    model = tied(tie_lora_A=True).eval()
    model.save_pretrained(tmp_path / "tied")
    tensors = load_file(tmp_path / "tied" / "adapter_model.safetensors")
    a_keys = sorted(k for k in tensors if "lora_A" in k)
    assert a_keys == ["base_model.model.tied_lora_A.q_proj.weight", "base_model.model.tied_lora_A.v_proj.weight"]
    assert sum(".lora_B.weight" in k for k in tensors) == 4
    loaded = pf.PeftModel.from_pretrained(tiny(), tmp_path / "tied")
    assert loaded.peft_config["default"].tie_lora_A
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, rtol=0, atol=0)
    # a file in PEFT's layout (one A per layer) under a config that ties A: refused, saying why
    untied = tied()
    untied.save_pretrained(tmp_path / "peft")
    cfg = (
        (tmp_path / "peft" / "adapter_config.json")
        .read_text()
        .replace('"peft_type"', '"tie_lora_A": true, "peft_type"')
    )
    (tmp_path / "peft" / "adapter_config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"ties lora_A across layers.*one lora_A per layer \(PEFT's layout"):
        pf.PeftModel.from_pretrained(tiny(), tmp_path / "peft")


def test_tied_a_and_b_is_one_lora_for_all_layers(tmp_path):
    model = tied(tie_lora_A=True, tie_lora_B=True)
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 * 32 + 32 * 4)
    model.save_pretrained(tmp_path)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 4


def test_tied_lora_bad_configs():
    with pytest.raises(ValueError, match="tie_lora_A"):
        pf.LoraConfig(target_modules=QV, tie_lora_A="yes")
    with pytest.raises(ValueError, match="pissa"):
        pf.LoraConfig(target_modules=QV, tie_lora_A=True, init_lora_weights="pissa")
    with pytest.raises(
        ValueError, match=r"'q_proj' layers cannot share factors.*layers\.0\.self_attn\.q_proj: A \(4, 32\)"
    ):
        pf.get_peft_model(
            tiny(),
            pf.LoraConfig(target_modules=QV, r=4, rank_pattern={"layers.1.self_attn.q_proj": 2}, tie_lora_A=True),
        )


def test_untied_lora_config_file_has_no_tie_fields(tmp_path):
    tied().save_pretrained(tmp_path)  # PEFT reads this file: no fields it does not know
    assert "tie_lora" not in (tmp_path / "adapter_config.json").read_text()


# ---- one base model shared by several task adapters ----------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3", "adapter"])
def test_switching_task_adapters_on_one_base(method):
    configs = {
        "lora": lambda: pf.LoraConfig(target_modules=QV, init_lora_weights=False),
        "ia3": lambda: pf.IA3Config(init_ia3_weights=False),
        "adapter": lambda: pf.AdapterConfig(init_adapter_weights=False),
    }
    base = tiny()
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    torch.manual_seed(10)
    model = pf.get_peft_model(base, configs[method]())
    torch.manual_seed(11)
    model.add_adapter("task_b", configs[method]())
    x = ids()
    # each task adapter alone on its own copy of the base: the outputs to reproduce
    own = {}
    for name, seed in (("default", 10), ("task_b", 11)):
        fresh = tiny()
        torch.manual_seed(seed)
        own[name] = pf.get_peft_model(fresh, configs[method]())
    with torch.no_grad():
        for name in ("default", "task_b", "default", "task_b"):
            model.set_adapter(name)
            torch.testing.assert_close(model(x).logits, own[name](x).logits, rtol=0, atol=0)
        assert (own["default"](x).logits - own["task_b"](x).logits).abs().max() > 1e-4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("task_b" in n for n in trainable)
    current = dict(model.get_base_model().named_parameters())
    for n, p in base_state.items():
        live = current.get(n)
        if live is None:  # wrapped modules: the frozen tensor now sits one level down
            live = next(t for k, t in current.items() if k.replace(".base_layer", "").replace(".base_module", "") == n)
        assert torch.equal(live, p), n
