"""The frame every method plugs into: the PEFT-type registry, PeftModel's adapter bookkeeping over a
BaseTuner, save/load dispatch by peft_type, and the report's ΔW rows — exercised with a minimal method
(a learned output scale on one linear layer) defined here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

import pyfastpeft as pf
from pyfastpeft.tuners import BaseTuner, PeftModel, config_from_dict, get_peft_model, register_peft_type


@dataclass
class ScaleConfig:
    target: str = "0"
    init: float = 1.0
    peft_type: str = "TEST_SCALE"
    inference_mode: bool = False

    def validate(self) -> None:
        if self.init <= 0:
            raise ValueError(f"init: expected a positive number, got {self.init}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScaleConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ScaleModel(BaseTuner):
    """y = s ⊙ (W x + b) on one linear layer."""

    def _layer(self, config: ScaleConfig) -> nn.Linear:
        return self.model.get_submodule(config.target)

    def _inject(self, name: str, config: ScaleConfig) -> None:
        if "scales" not in self._modules:
            self.scales = nn.ParameterDict()
            self._hook = None
        self.scales[name] = nn.Parameter(torch.full((self._layer(config).out_features,), config.init))

    def _remove(self, name: str) -> None:
        del self.scales[name]

    def _activate(self, names: list[str]) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if names:
            scale = self.scales[names[0]]
            self._hook = self._layer(self.peft_config.get(names[0], ScaleConfig())).register_forward_hook(
                lambda m, i, o: o * scale
            )

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{self.peft_config[name].target}.scale": self.scales[name]}

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        layer = self._layer(self.peft_config[name])
        return {self.peft_config[name].target: layer.weight * (self.scales[name][:, None] - 1)}


register_peft_type("TEST_SCALE", ScaleConfig, ScaleModel)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_dispatch_train_save_load(tmp_path):
    base = model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, ScaleConfig(init=1.0))
    assert type(pm) is PeftModel and isinstance(pm.base_model, ScaleModel)
    x = torch.randn(7, 5)
    torch.testing.assert_close(pm(x), model()(x), rtol=0, atol=0)  # identity at init
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        pm(x).square().sum().backward()
        opt.step()
    assert not torch.equal(pm.scales["default"], torch.ones(4))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k  # frozen base untouched
    y = pm(x)

    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model(), tmp_path)  # dispatches on peft_type
    assert isinstance(loaded.base_model, ScaleModel)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(model(), tmp_path, is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["base_model.scales.default"]
    assert isinstance(config_from_dict(ScaleConfig().to_dict()), ScaleConfig)


def test_named_adapters_and_disable():
    pm = get_peft_model(model(), ScaleConfig(init=2.0))
    pm.add_adapter("other", ScaleConfig(init=3.0))
    x = torch.randn(2, 5)
    plain = model()
    h = plain[0](x)
    # the layer's output times its scale: the same single multiplication as the expected value, so exact
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(pm.get_base_model()[0](x), 2 * h, **exact)
    pm.set_adapter("other")
    torch.testing.assert_close(pm.get_base_model()[0](x), 3 * h, **exact)
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["base_model.scales.other"]
    with pm.disable_adapter():
        torch.testing.assert_close(pm.get_base_model()[0](x), h, **exact)
    torch.testing.assert_close(pm.get_base_model()[0](x), 3 * h, **exact)
    pm.delete_adapter("other")
    assert pm.active_adapter == "default"
    torch.testing.assert_close(pm.get_base_model()[0](x), 2 * h, **exact)


def test_report_counts_delta_rows():
    pm = get_peft_model(model(), ScaleConfig(init=1.0))
    with torch.no_grad():
        pm.scales["default"][1] = 2.0
    r = pf.report(pm)
    assert r.trainable == 4 and r.total == sum(p.numel() for p in model().parameters()) + 4
    assert [(m.name, m.shape, m.delta_rank, m.changed_entries) for m in r.matrices] == [("0", (4, 5), 1, 5)]
    assert r.changed_entries == 5
    assert r.adapter_bytes_on_disk is not None and r.adapter_bytes_on_disk > 0
    assert "0" in str(r)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="init"):
        get_peft_model(model(), ScaleConfig(init=-1.0))
    with pytest.raises(ValueError, match="peft_config: expected one of"):
        get_peft_model(model(), object())
    pm = get_peft_model(model(), ScaleConfig())
    with pytest.raises(ValueError, match="already a PEFT model"):
        PeftModel(pm, ScaleConfig())
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("default", ScaleConfig())
    with pytest.raises(ValueError, match="reserved"):
        pm.add_adapter("__base__", ScaleConfig())
    with pytest.raises(ValueError, match="holds ScaleConfig adapters"):
        pm.add_adapter("lora", pf.LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_adapter()
    pm.save_pretrained(tmp_path)
    raw = (tmp_path / "adapter_config.json").read_text().replace("TEST_SCALE", "NOPE")
    (tmp_path / "adapter_config.json").write_text(raw)
    with pytest.raises(ValueError, match="peft_type 'NOPE' is not supported"):
        PeftModel.from_pretrained(model(), tmp_path)
