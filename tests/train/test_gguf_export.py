"""A LoRA adapter merged into a GGUF base and written back as GGUF: the written weights are the merged
ones (in the chosen format), the tokenizer comes from the base file, and the bases are resolved or
refused clearly."""

from __future__ import annotations

import pytest
import torch

from pyfastpeft import LoraConfig, get_peft_model
from pyfastpeft.errors import UserError
from pyfastpeft.models import pretrained
from pyfastpeft.models.gguf_file import gguf_tokenizer, read_gguf_tensors
from pyfastpeft.train.gguf_export import export_gguf

from ..models.gguf_fixtures import dequantize, quantize, random_hf_state, write_tiny_gguf

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "down_proj"]


@pytest.fixture
def lora_on_gguf(tmp_path):
    """(base GGUF file, its converted float folder, adapter folder, {name: merged float64 weight}) for a
    LoRA with non-zero B."""
    gguf_path = tmp_path / "base.gguf"
    write_tiny_gguf(gguf_path, random_hf_state(seed=7))
    folder, _ = pretrained.resolve_folder(gguf_path, log=lambda *a: None)
    model, _, _ = pretrained.load_folder(folder, "base")
    base = {k: v.double().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    merged = dict(base)
    for name, module in adapted.named_modules():
        if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.ModuleDict):
            with torch.no_grad():
                module.lora_B["default"].weight.normal_(0, 0.05)
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            key = name.removeprefix("base_model.model.") + ".weight"
            merged[key] = base[key] + (8 / 4) * b @ a
    assert sum(not torch.equal(merged[k], base[k]) for k in merged) == 2 * 2 + 2  # q, k per layer, down per layer
    adapter = tmp_path / "adapter"
    adapted.save_pretrained(str(adapter))
    return gguf_path, folder, adapter, merged


def test_the_file_holds_the_merged_weights_and_the_bases_tokenizer(tmp_path, lora_on_gguf):
    gguf_path, _, adapter, merged = lora_on_gguf
    logs = []
    out = export_gguf(adapter, tmp_path / "out.gguf", "f16", base=gguf_path, quantize=quantize, log=logs.append)
    assert any("GGUF (f16) written to" in line and "lora merged" in line for line in logs), logs
    got = {t.hf_name: t for t in read_gguf_tensors(out)}
    assert set(got) == {k for k in merged if k != "lm_head.weight"}  # tied
    for name, t in got.items():
        want = merged[name]
        if t.data.dim() == 2:
            assert t.qtype == 1
            # one float16 rounding of the float32 merged weight (subnormal values: half the smallest step)
            bound = want.abs() * 2.0**-11 + 2.0**-25 + want.abs() * 2.0**-23
            assert ((t.data.double() - want).abs() <= bound).all(), name
        else:
            assert torch.equal(t.data.double(), want), name
    assert gguf_tokenizer(out)("the cat").input_ids == gguf_tokenizer(gguf_path)("the cat").input_ids


def test_a_quantized_export_is_the_merged_weights_blocks(tmp_path, lora_on_gguf):
    gguf_path, folder, adapter, merged = lora_on_gguf
    # the converted folder finds its GGUF file by itself
    out = export_gguf(adapter, tmp_path / "q.gguf", "q8_0", base=folder, quantize=quantize, log=lambda *a: None)
    for t in read_gguf_tensors(out):
        if t.quantized:
            want = merged[t.hf_name].float()
            rows, cols = t.shape
            # Q8_0 rounds each value to the step d = (block's largest magnitude) / 127, d itself rounded to
            # float16: error <= d / 2 + 127 * d * 2^-11
            err = (dequantize(t.data, 8, rows, cols) - want).abs().reshape(rows, cols // 32, 32)
            step = want.abs().reshape(rows, cols // 32, 32).amax(-1, keepdim=True) / 127
            assert (err <= step * (0.5 + 127 * 2.0**-11) + 1e-12).all(), t.hf_name


def test_bases_that_cannot_be_exported_are_refused(tmp_path, lora_on_gguf):
    gguf_path, folder, adapter, _ = lora_on_gguf
    with pytest.raises(UserError, match="quant: expected one of f16, q8_0, q4_0, q4_1"):
        export_gguf(adapter, tmp_path / "o.gguf", "q5_k", base=gguf_path, quantize=quantize)
    with pytest.raises(UserError, match="the built-in model has no GGUF form"):
        export_gguf(adapter, tmp_path / "o.gguf", "f16", base="builtin", quantize=quantize)
    plain = tmp_path / "plain"
    transformers.AutoModelForCausalLM.from_pretrained(str(folder)).save_pretrained(str(plain))
    with pytest.raises(UserError, match="was not converted from a GGUF file here"):
        export_gguf(adapter, tmp_path / "o.gguf", "f16", base=plain, quantize=quantize)
    with pytest.raises(UserError, match="is a folder"):
        export_gguf(adapter, tmp_path, "f16", base=gguf_path, quantize=quantize)
    assert not (tmp_path / "o.gguf").exists()


def test_the_export_command_quantizes_with_the_projects_kernels(tmp_path, lora_on_gguf, capsys):
    from pyfastpeft import cli

    gguf_path, _, adapter, merged = lora_on_gguf
    out = tmp_path / "cli.gguf"
    argv = ["export", "--gguf", str(out), "--quant", "q4_1", "--adapter", str(adapter), "--model", str(gguf_path)]
    assert cli.main(argv) == 0
    tensors = {t.hf_name: t for t in read_gguf_tensors(out)}
    # the token table keeps 8 bits by default under a 4-bit format; every projection is Q4_1
    assert tensors["model.embed_tokens.weight"].qtype == 8
    projections = [t for name, t in tensors.items() if t.quantized and name != "model.embed_tokens.weight"]
    assert projections and all(t.qtype == 3 for t in projections)
    for t in tensors.values():
        if t.quantized:
            # the merged float32 weight quantized by the gguf package's reference gives the same bytes
            want = quantize(merged[t.hf_name].float(), t.qtype)
            assert torch.equal(t.data, want), t.hf_name
    assert "GGUF (q4_1) written to" in capsys.readouterr().out


def test_the_export_command_answers_a_bad_adapter_in_one_line(tmp_path, capsys):
    from pyfastpeft import cli

    argv = ["export", "--gguf", str(tmp_path / "o.gguf"), "--quant", "q8_0", "--adapter", str(tmp_path / "none")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyfastpeft: error: ")
    assert not (tmp_path / "o.gguf").exists()
