"""The CPU-runnable parts of the staged GPU run: the stage script's syntax and argument handling, the
summary writer, the sanitizer cases and the GPU benchmark's code paths (tiny sizes on the CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "scripts" / "gpu.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_sanitize_cases  # noqa: E402
import gpu_summary  # noqa: E402

import bench._timing  # noqa: E402
from bench import bench_gpu  # noqa: E402


def run(*cmd: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_gpu_sh_parses():
    assert run("bash", "-n", str(GPU_SH)).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_gpu_sh_shellcheck_clean():
    r = run("shellcheck", str(GPU_SH))
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("args", [("--stage", "nonsense"), ("--bogus",)])
def test_gpu_sh_refuses_bad_arguments(args):
    r = run("bash", str(GPU_SH), *args)
    assert r.returncode == 2 and r.stderr.startswith("gpu.sh: error:"), r.stderr


def test_summary_records_each_stage(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text(
        "tests/a.py::t1[cuda] PASSED\nFAILED tests/a.py::t2[cuda] - boom\n"
        "===== 1 failed, 7 passed, 2 skipped in 3.1s =====\n"
    )
    san = tmp_path / "sanitize_racecheck.log"
    san.write_text("========= ERROR SUMMARY: 3 errors\n")
    base = ["--results", str(tmp_path)]
    assert (
        gpu_summary.main(
            ["record", *base, "--stage", "tests", "--rc", "1", "--seconds", "3.2", "--budget", "140", "--log", str(log)]
        )
        == 0
    )
    assert (
        gpu_summary.main(
            [
                "record",
                *base,
                "--stage",
                "sanitize_racecheck",
                "--rc",
                "124",
                "--seconds",
                "45",
                "--budget",
                "45",
                "--log",
                str(san),
            ]
        )
        == 0
    )
    assert gpu_summary.main(["skip", *base, "--stage", "bench", "--reason", "no time left"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    tests = summary["stages"]["tests"]
    assert tests["status"] == "failed"
    assert tests["details"] == {"failed": 1, "passed": 7, "skipped": 2, "failures": ["tests/a.py::t2[cuda]"]}
    assert summary["stages"]["sanitize_racecheck"]["status"] == "timeout"
    assert summary["stages"]["sanitize_racecheck"]["details"]["errors"] == 3
    assert summary["stages"]["bench"] == {"status": "skipped", "reason": "no time left"}
    md = (tmp_path / "summary.md").read_text()
    assert "| tests | failed |" in md and "`tests/a.py::t2[cuda]`" in md


def test_summary_counts_a_pytest_run_cut_short():
    text = "tests/a.py::x[cuda] PASSED [ 1%]\ntests/a.py::y[cuda] FAILED [ 2%]\ntests/b.py::z[cuda] PASSED [ 3%]\n"
    assert gpu_summary.parse_pytest(text) == {"passed": 2, "failed": 1, "complete": False, "failures": []}


def test_summary_refuses_a_missing_results_folder(tmp_path, capsys):
    assert gpu_summary.main(["skip", "--results", str(tmp_path / "no"), "--stage", "x", "--reason", "r"]) == 2
    assert "gpu_summary: error: --results" in capsys.readouterr().err


def test_sanitize_cases_run_on_the_cpu(capsys):
    assert gpu_sanitize_cases.main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.count(" ok ") == len(gpu_sanitize_cases.CASES) == 8


def test_sanitize_cases_refuse_an_unknown_case(capsys):
    assert gpu_sanitize_cases.main(["--device", "cpu", "--only", "lora,nope"]) == 2
    assert "unknown case" in capsys.readouterr().err


def test_bench_gpu_code_paths_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(bench._timing, "RESULTS", tmp_path)
    assert (
        bench_gpu.main(
            ["--device", "cpu", "--tiny", "--rounds", "1", "--sections", "optim,reductions,kd,multi_lora,lm_loss"]
        )
        == 0
    )
    data = json.loads((tmp_path / "bench_gpu_tiny_cpu.json").read_text())
    assert set(data["ceilings"]) == {"copy_GBps", "bf16_matmul_TFLOPs"} and data["failed_sections"] == {}
    figures = {row["figure"].split(" ")[0] for row in data["rows"]}
    assert figures == {"AdamW", "bias", "ia3", "KD", "multi-LoRA", "LM"}
    assert all(("of_copy_bw" in row) != ("of_bf16_matmul" in row) for row in data["rows"])


def test_bench_gpu_refuses_bad_arguments(capsys):
    assert bench_gpu.main(["--device", "cpu", "--sections", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
