"""prepare_qat → train → convert → save_quantized / load_quantized round trips."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import pyfastpeft as pf
from pyfastpeft.nn import FakeQuantLinear, QuantizedLinear
from pyfastpeft.quant import QATConfig, convert, load_quantized, prepare_qat, save_quantized
from pyfastpeft.tuners import LoraLinear


class Block(nn.Module):
    """A Llama-like MLP block (gate / up / down projections, SiLU gate, residual)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=True)

    def forward(self, x):
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyModel(nn.Module):
    def __init__(self, hidden=64, inter=128, layers=2, vocab=96):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, inter) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def make_model(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return TinyModel().to(device=device, dtype=dtype)


def test_prepare_qat_swaps_targets_and_keeps_parameters():
    model = make_model()
    before = {n: p for n, p in model.named_parameters()}
    prepare_qat(model, QATConfig.int8_dynamic_activation_int4_weight(exclude_modules=["lm_head"]))
    assert isinstance(model.layers[0].gate_proj, FakeQuantLinear)
    assert type(model.lm_head) is nn.Linear
    after = {n: p for n, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)


def test_prepare_qat_target_patterns():
    model = prepare_qat(make_model(), QATConfig(target_modules=["up_proj", "layers.1.down_proj"]))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear | FakeQuantLinear)}
    assert kinds["layers.0.up_proj"] == kinds["layers.1.up_proj"] == kinds["layers.1.down_proj"] == "FakeQuantLinear"
    assert kinds["layers.0.down_proj"] == kinds["layers.0.gate_proj"] == "Linear"
    model = prepare_qat(make_model(), QATConfig(target_modules=r"layers\.\d+\.(gate|up)_proj"))
    assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="target_modules"):
        prepare_qat(make_model(), QATConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="config"):
        prepare_qat(make_model(), {"weight_bits": 4})
    with pytest.raises(ValueError, match="FakeQuantLinear"):
        convert(make_model())


@pytest.mark.parametrize(
    "config",
    [
        QATConfig.int8_dynamic_activation_int4_weight(group_size=32),
        QATConfig.weight_only(bits=4, group_size=64, weight_symmetric=False),
        QATConfig(weight_bits=8, weight_group_size=-1, activation_bits=8),
        QATConfig.weight_only(bits=2, group_size=32),
        QATConfig.int8_dynamic_activation_int4_weight(learnable_scale=True),
    ],
    ids=["8da4w", "w4_asym", "w8_channel", "w2", "8da4w_lsq"],
)
def test_train_convert_save_load_round_trip(tmp_path, device, config):
    model = prepare_qat(make_model(device=device), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, 96, (4, 12), device=device)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(ids)
        convert(model)
        assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
        assert torch.equal(model(ids), expected)

    path = tmp_path / "sub" / "model.safetensors"
    save_quantized(model, path)
    assert os.listdir(path.parent) == ["model.safetensors"]  # the temporary file was renamed away
    with safe_open(str(path), framework="pt") as f:
        qweight = f.get_tensor("layers.0.gate_proj.qweight")
        packed = {2: 4, 4: 2}.get(config.weight_bits, 1)
        assert qweight.shape == (128, 64 // packed)
        assert qweight.dtype == (torch.uint8 if packed > 1 else torch.int8)

    fresh = load_quantized(make_model(seed=1, device=device), path)
    assert isinstance(fresh.layers[1].up_proj, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(fresh(ids), expected)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = convert(prepare_qat(make_model(), QATConfig()))
    path = tmp_path / "m.safetensors"
    save_quantized(model, path)
    original = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pyfastpeft.quant.qat.save_file", boom)
    with pytest.raises(OSError):
        save_quantized(model, path)
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["m.safetensors"]
    with pytest.raises(ValueError, match="QuantizedLinear"):
        save_quantized(make_model(), tmp_path / "x.safetensors")


def test_lora_over_quantized_base_trains_only_lora():
    """QLoRA-style: convert a QAT model, wrap its quantized linears with LoRA, train the adapters."""
    model = convert(prepare_qat(make_model(), QATConfig.int8_dynamic_activation_int4_weight()))
    for block in model.layers:
        block.up_proj = LoraLinear(block.up_proj, r=4, lora_alpha=8)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    ids = torch.randint(0, 96, (4, 12))
    opt = torch.optim.Adam(lora, lr=1e-2)
    first = None
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 96), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_hugging_face_llama_round_trip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prepare_qat(model, QATConfig.int8_dynamic_activation_int4_weight(target_modules=["q_proj", "v_proj", "down_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        convert(model)
        assert torch.equal(model(ids).logits, expected)
    assert pf.quant.convert is convert
