"""`pyfastpeft report` and `pyfastpeft merge` on adapters the command wrote, and their error paths."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.train.base import builtin_model
from pyfastpeft.train.saved_adapter import read_saved_adapter, rebuild, run_arguments
from tests.conftest import assert_as_accurate_as, python_m_pyfastpeft
from tests.tuners.hf_tiny_models import llama_config

from .conftest import TINY, run_cli


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert run_cli("finetune", "--steps", "4", "--r", "4", "--out", out, *TINY) == 0
    return out


def _report(capsys, *argv) -> dict:
    capsys.readouterr()
    assert run_cli("report", *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_report_from_the_files_alone(tmp_path, lora_dir, capsys):
    # without pyfastpeft_run.json the adapter does not say its base: the report reads the factors only
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(lora_dir / name, bare / name)
    d = _report(capsys, bare)
    tensors = load_file(str(bare / "adapter_model.safetensors"))
    config = json.loads((bare / "adapter_config.json").read_text())
    assert d["base"] is None and "total" not in d
    assert d["trainable"] == sum(t.numel() for t in tensors.values())
    assert d["bytes_on_disk"] == sum(p.stat().st_size for p in bare.iterdir())
    assert len(d["matrices"]) == 2 * 7
    scaling = config["lora_alpha"] / config["r"]
    for m in d["matrices"]:
        key = "base_model.model." + m["name"]
        a, b = tensors[key + ".lora_A.weight"].double(), tensors[key + ".lora_B.weight"].double()
        delta = scaling * b @ a
        assert m["r"] == 4 and m["shape"] == list(delta.shape)
        assert m["delta_rank"] == int(torch.linalg.matrix_rank(delta))
        assert m["changed_entries"] == int(torch.count_nonzero(delta))
    assert any(m["delta_rank"] > 0 for m in d["matrices"])
    assert d["changed_entries"] == sum(m["changed_entries"] for m in d["matrices"])
    capsys.readouterr()
    assert run_cli("report", bare) == 0
    table = capsys.readouterr().out
    assert "rank ΔW" in table and "model.layers.0.self_attn.q_proj" in table and "--base" in table


def test_report_with_the_builtin_base_adds_totals(lora_dir, capsys):
    d = _report(capsys, lora_dir)
    saved = read_saved_adapter(lora_dir)
    base_params = sum(p.numel() for p in builtin_model(run_arguments(saved.run), lambda *a: None).parameters())
    assert d["base"].startswith("built-in model") and d["base_params"] == base_params
    assert d["total"] == base_params + d["trainable"]
    assert d["trainable_percent"] == pytest.approx(100 * d["trainable"] / d["total"])
    assert len(d["matrices"]) == 14 and all(0 <= m["delta_rank"] <= 4 for m in d["matrices"])


def test_report_of_a_sparse_adapter_with_base(tmp_path, capsys):
    out = tmp_path / "sparse"
    assert run_cli("finetune", "--method", "sparse", "--steps", "3", "--out", out, *TINY) == 0
    d = _report(capsys, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))  # a PEFT-layout adapter (peft_type SPARSE)
    deltas = {k.removeprefix("base_model.model."): v for k, v in tensors.items() if k.endswith(".delta")}
    assert d["trainable"] == sum(v.numel() for v in deltas.values())
    assert d["changed_entries"] == sum(int(torch.count_nonzero(v)) for v in deltas.values())
    assert {m["name"] for m in d["matrices"]} <= {k.removesuffix(".delta") + ".weight" for k in deltas}


def _adapted_and_merged_logits(adapter_dir, merged_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapted model's logits in float32 and in float64, and the merged model's."""
    saved = read_saved_adapter(adapter_dir)
    adapted = rebuild(builtin_model(run_arguments(saved.run), lambda *a: None), saved)
    config = json.loads((merged_dir / "config.json").read_text())
    fields = {k: v for k, v in config.items() if k in TinyLlamaConfig.__dataclass_fields__}
    merged = TinyLlamaForCausalLM(TinyLlamaConfig(**fields))
    merged.load_state_dict(load_file(str(merged_dir / "model.safetensors")))
    ids = torch.randint(0, fields["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted64 = copy.deepcopy(adapted).double()(input_ids=ids).logits
        return adapted(input_ids=ids).logits, adapted64, merged.eval()(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "dora", "sparse", "qat-lora", "freeze"])
def test_merge_builtin_equals_the_adapted_model(tmp_path, method, capsys):
    run = tmp_path / "run"
    assert run_cli("finetune", "--method", method, "--steps", "3", "--out", run, *TINY) == 0
    out = tmp_path / "merged"
    capsys.readouterr()
    assert run_cli("merge", "builtin", run, out) == 0
    text = capsys.readouterr().out
    assert "max |merged - adapted| logit difference" in text
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    adapted, adapted64, merged = _adapted_and_merged_logits(run, out)
    # the merged weights are rounded once more than the adapted path's: judged against float64
    assert_as_accurate_as("merged", merged, adapted, adapted64)
    base = builtin_model(run_arguments(read_saved_adapter(run).run), lambda *a: None)
    with torch.no_grad():
        ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
        assert (base(input_ids=ids).logits - adapted).abs().max() > 1e-6  # the adapter changed something


def test_merge_refuses_what_the_base_cannot_hold(tmp_path, capsys):
    run = tmp_path / "bitfit"
    assert run_cli("finetune", "--method", "bitfit", "--steps", "2", "--out", run, *TINY) == 0
    out = tmp_path / "merged"
    assert run_cli("merge", "builtin", run, out) == 2
    err = capsys.readouterr().err
    assert "method bitfit adds tensors the base architecture has no place for" in err and ".bias" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_merge_into_a_hugging_face_folder(tmp_path, lora_dir, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = llama_config(vocab_size=300, intermediate_size=64)
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    run = tmp_path / "run"
    short = ["--steps", "2", "--batch-size", "4", "--length", "4", "--log-every", "1000"]
    assert run_cli("finetune", "--model", hf, "--method", "dora", "--out", run, *short) == 0
    out = tmp_path / "merged"
    assert run_cli("merge", hf, run, out) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    saved = read_saved_adapter(run)
    adapted = rebuild(transformers.AutoModelForCausalLM.from_pretrained(hf), saved)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected64 = adapted(input_ids=ids).logits, copy.deepcopy(adapted).double()(input_ids=ids).logits
        assert_as_accurate_as("merged", merged(input_ids=ids).logits, expected, expected64)
    # the adapter of the built-in model does not fit this base: the mismatched shapes are named
    capsys.readouterr()
    assert run_cli("merge", hf, lora_dir, tmp_path / "nope") == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "shape mismatches" in err
    assert "self_attn.k_proj.lora_B.weight: file [64, 4] vs model [16, 4]" in err
    assert not (tmp_path / "nope").exists()
    assert run_cli("merge", "builtin", run, tmp_path / "nope") == 2
    assert f"was trained on {hf}; only adapters trained on the built-in model fit it" in capsys.readouterr().err
    # report without --base loads the folder the run recorded while it exists, and reads the files alone
    # once it has moved
    assert run_cli("report", run, "--json") == 0
    with_base = json.loads(capsys.readouterr().out)
    assert with_base["base"] == f"Hugging Face model {hf} (LlamaForCausalLM)" and with_base["total"] > 0
    hf.rename(tmp_path / "moved")
    assert run_cli("report", run, "--json") == 0
    files_only = json.loads(capsys.readouterr().out)
    assert files_only["base"] is None and files_only["trainable"] == with_base["trainable"]


def test_report_and_merge_errors(tmp_path, lora_dir, capsys):
    def error(*argv) -> str:
        capsys.readouterr()
        assert run_cli(*argv) == 2
        return capsys.readouterr().err

    assert "no such adapter folder" in error("report", tmp_path / "missing")
    pickle = tmp_path / "adapter_model.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")
    assert "refusing to read a pickle file" in error("report", pickle)
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(pickle, folder / "adapter_model.bin")
    assert "refusing to read a pickle file" in error("report", folder)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(lora_dir, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "not a valid safetensors file" in error("report", corrupt)
    assert "not a valid safetensors file" in error("merge", "builtin", corrupt, tmp_path / "m")
    bad_json = tmp_path / "badjson"
    shutil.copytree(lora_dir, bad_json)
    (bad_json / "adapter_config.json").write_text("{")
    assert "adapter_config.json: not valid JSON" in error("report", bad_json)
    assert "no such folder" in error("report", lora_dir, "--base", tmp_path / "nobase")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert "exists and is not an empty folder" in error("merge", "builtin", lora_dir, busy)
    assert (busy / "keep.txt").read_text() == "x"
    assert not (tmp_path / "m").exists()


def test_python_m_report_and_merge(tmp_path, lora_dir):
    expect = {"report": "trainable params", "merge": "merged model written to"}
    for argv in (["report", str(lora_dir)], ["merge", "builtin", str(lora_dir), str(tmp_path / "m")]):
        out = python_m_pyfastpeft(*argv)
        assert out.returncode == 0, out.stderr
        assert expect[argv[0]] in out.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()
    out = python_m_pyfastpeft("report", timeout=120)
    assert out.returncode == 2 and "adapter" in out.stderr


def test_compare_defaults_to_every_registered_method():
    from pyfastpeft.cli import build_parser
    from pyfastpeft.train import METHODS

    assert {"dora", "sparse", "qat-lora", "distill"} <= set(METHODS)
    assert build_parser().parse_args(["compare"]).methods.split(",") == sorted(METHODS)
