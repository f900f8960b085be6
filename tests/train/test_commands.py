"""`pyfastpeft compare` and `pyfastpeft bench`."""

from __future__ import annotations

import json

import torch

from pyfastpeft.train.compare import change_report

from .conftest import run_cli


def test_change_report_counts_entries_and_rank():
    base = {"w": torch.zeros(4, 5), "b": torch.zeros(3)}
    tuned = {
        "w": torch.outer(torch.arange(1.0, 5.0), torch.ones(5)),
        "b": torch.tensor([0.0, 1.0, 0.0]),
        "new.bias": torch.tensor([0.0, 2.0]),
    }
    assert change_report(base, tuned) == (20 + 1 + 1, 1)


def test_compare_writes_one_table_per_size(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        run_cli(
            "compare",
            "--methods",
            "lora,bitfit,full",
            "--sizes",
            "small",
            "--steps",
            "3",
            "--pretrain-steps",
            "20",
            "--batch-size",
            "8",
            "--out",
            out,
        )
        == 0
    )
    text = (out / "compare.md").read_text()
    assert "## small" in text and "| lora |" in text and "| bitfit |" in text
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["small"]}
    # full fine-tuning changes nearly every entry (not embedding rows of tokens that never occur);
    # LoRA changes its target matrices with rank <= r = 8
    assert 0.9 * rows["full"]["trainable"] < rows["full"]["changed"] <= rows["full"]["trainable"]
    assert 0 < rows["lora"]["rank of change"] <= 8
    assert rows["bitfit"]["changed"] <= rows["bitfit"]["trainable"]


def test_compare_unknown_names(capsys):
    assert run_cli("compare", "--methods", "lora,nope") == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert run_cli("compare", "--sizes", "huge") == 2
    assert "unknown size 'huge'" in capsys.readouterr().err


FAKE_BENCH = """
import json, os, sys
rows = [{"layer": "reference", "ms": 2.0}, {"layer": "pyfastpeft", "ms": 1.0, "x_ref": 0.5}]
print("fake table", " ".join(sys.argv[1:]))
path = os.path.join(os.environ["PYFASTPEFT_BENCH_RESULTS"], "lora_cpu.json")
json.dump({"command": "fake", "rows": rows}, open(path, "w"))
"""


def test_bench_collects_json_and_skips_missing_scripts(tmp_path, monkeypatch, capsys):
    from pyfastpeft.train import bench_runner

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_lora.py").write_text(FAKE_BENCH)
    monkeypatch.setattr(bench_runner, "bench_dir", lambda: bench)
    out = tmp_path / "out"
    assert run_cli("bench", "--op", "lora,quant", "--quick", "--out", out) == 0
    text = capsys.readouterr().out
    assert "fake table --device cpu --quick" in text
    assert "quant: no bench/bench_quant.py yet, skipped" in text
    rows = json.loads((out / "bench.json").read_text())
    assert [r["layer"] for r in rows] == ["reference", "pyfastpeft"] and rows[1]["x_ref"] == 0.5
    assert "| lora_cpu | pyfastpeft | 1.000 | 0.500 |" in (out / "bench.md").read_text()


def test_bench_rejects_unknown_ops(capsys):
    assert run_cli("bench", "--op", "nosuchop") == 2
    assert "--op: unknown" in capsys.readouterr().err


def test_curves_without_matplotlib_fall_back_to_csv(tmp_path, monkeypatch):
    from pyfastpeft.train import plot

    monkeypatch.setattr(plot, "pyplot_or_none", lambda: None)
    hist = {"step": [1, 2], "loss": [2.0, 1.0], "eval_step": [0, 2], "metric": [0.0, 0.5]}
    paths, note = plot.write_curves(tmp_path, hist, "exact match")
    assert paths == [tmp_path / "curves.csv"] and "matplotlib is not installed" in note
    assert (tmp_path / "curves.csv").read_text().splitlines() == [
        "step,loss,exact match",
        "1,2.000000,",
        "2,1.000000,0.500000",
    ]
