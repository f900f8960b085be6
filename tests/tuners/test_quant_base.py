"""LoRA over a fake-quantized (QAT) or converted integer base through get_peft_model (QA-LoRA / QLoRA style)."""

from __future__ import annotations

import pytest
import torch

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.nn import FakeQuantLinear, QuantizedLinear
from pyfastpeft.quant import QATConfig, convert, prepare_qat
from pyfastpeft.tuners.lora.layer import LoraLinear
from tests.conftest import assert_within_rounding

TARGETS = ["q_proj", "v_proj", "down_proj"]


def quantized_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = prepare_qat(TinyLlamaForCausalLM(cfg), QATConfig.int8_dynamic_activation_int4_weight(group_size=32))
    return convert(model) if kind == "converted" else model


@pytest.mark.parametrize("kind", ["fake", "converted"])
def test_lora_on_a_quantized_base_matches_the_formula_and_trains(kind):
    model = quantized_model(kind)
    base_cls = FakeQuantLinear if kind == "fake" else QuantizedLinear
    peft = pf.get_peft_model(model, pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    layers = [m for m in peft.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 6 and all(isinstance(m.base_layer, base_cls) for m in layers)
    layer = layers[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, 64)
    y = layer(x)
    # y = base(x) + s·B·A·aq(x): the adapter sees the same quantized activations as the base product
    base = layer.base_layer
    xq = base.quantize_input(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    xq64, a64, b64, w64 = (t.detach().double() for t in (xq, a, b, layer.weight_oi()))
    bias = base.bias.detach().double().abs() if base.bias is not None else 0.0
    expected = base(x).detach().double() + s * (xq64 @ a64.t() @ b64.t())
    magnitude = xq64.abs() @ w64.abs().t() + bias + abs(s) * (xq64.abs() @ a64.abs().t() @ b64.abs().t())
    # sums over in and r (and the bias, the scale, the update added); three roundings to float32: base(x)
    # here, x·Aᵀ kept in float32 and the result (our base product may sum in another order than base(x))
    assert_within_rounding("y", y, expected, magnitude, terms=64 + 4 + 3, roundings=3)

    frozen = {n: t.detach().clone() for n, t in peft.state_dict().items() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 12))
    losses = []
    for _ in range(8):
        loss = peft(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, t in peft.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), n  # the quantized base is bit-identical


def test_quantized_base_refuses_merge_dora_and_pissa(tmp_path):
    model = quantized_model("fake")
    peft = pf.get_peft_model(model, pf.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="merge: the base is a FakeQuantLinear"):
        peft.merge_adapter()
    with pytest.raises(ValueError, match="DoRA and PiSSA need a float base weight"):
        pf.get_peft_model(quantized_model("fake"), pf.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))


def test_adapter_over_a_quantized_base_saves_and_loads(tmp_path):
    peft = pf.get_peft_model(quantized_model("converted"), pf.LoraConfig(r=4, target_modules=TARGETS))
    for m in peft.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight)
    ids = torch.randint(0, 64, (2, 7))
    peft.eval()
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    peft.save_pretrained(tmp_path / "a")
    loaded = pf.PeftModel.from_pretrained(quantized_model("converted"), tmp_path / "a")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)  # saved and loaded as is
