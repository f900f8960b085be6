"""Every user error on the command line is one ``pyfastpeft: error: ...`` line on stderr and exit status 2;
a bug in the program keeps its traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pyfastpeft import cli

from .conftest import python_m_pyfastpeft

# the smallest built-in run: no pretraining, one step
FAST = "--model tiny --size small --pretrain-steps 0 --steps 1 --length 2 --batch-size 2".split()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv: str) -> str:
    """The CLI in-process: asserts exit status 2 and one error line on stderr; returns the message."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyfastpeft: error: "), err
    return lines[0].removeprefix("pyfastpeft: error: ")


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--batch-size", "0", "expected an integer >= 1, got 0"),
        ("--length", "0", "expected an integer >= 1, got 0"),
        ("--steps", "-3", "expected an integer >= 1, got -3"),
        ("--stop-after", "-1", "expected an integer >= 1, got -1"),
        ("--seed", str(2**70), f"expected a seed in [0, 2**63 - 1], got {2**70}"),
        ("--seed", "-1", "expected an integer >= 0, got -1"),
        ("--device", "tpu", "expected cpu, cuda or cuda:N, got 'tpu'"),
        ("--device", "cuda:x", "expected cpu, cuda or cuda:N, got 'cuda:x'"),
        ("--lr", "0", "expected a finite number > 0, got 0.0"),
        ("--dropout", "1.5", "expected a number in [0.0, 1.0), got 1.5"),
        ("--r", "0", "expected an integer >= 1, got 0"),
        ("--batch-size", "many", "expected an integer, got 'many'"),
    ],
)
def test_out_of_range_flags(capsys, flag, value, expected):
    message = run(capsys, "finetune", flag, value)
    assert f"argument {flag}: {expected}" in message


def test_compare_and_bench_flags_are_checked_too(capsys):
    assert "argument --batch-size: expected an integer >= 1, got 0" in run(capsys, "compare", "--batch-size", "0")
    assert "argument --device: expected cpu, cuda or cuda:N, got 'tpu'" in run(capsys, "bench", "--device", "tpu")


def test_usage_errors_are_one_line(capsys):
    assert "invalid choice: 'nope'" in run(capsys, "finetune", "--task", "nope")
    assert "unrecognized arguments: --no-such-flag" in run(capsys, "finetune", "--no-such-flag")


def test_out_under_a_regular_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    message = run(capsys, "finetune", *FAST, "--out", blocker / "run")
    assert message == f"--out {blocker / 'run'}: {blocker} is a file, not a folder"
    assert run(capsys, "finetune", *FAST, "--out", blocker) == f"--out {blocker}: exists and is a file, not a folder"
    message = run(capsys, "merge", "builtin", tmp_path, blocker / "merged")
    assert message.startswith(f"out {blocker / 'merged'}: {blocker} is a file")


@pytest.mark.parametrize("content", [b"not a safetensors file", b"\xff" * 7, b""])
def test_resume_from_a_corrupt_checkpoint(capsys, tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    message = run(capsys, "finetune", *FAST, "--out", tmp_path / "o", "--resume", bad)
    assert message.startswith(f"--resume: {bad} is not a readable checkpoint (")


def test_resume_from_a_safetensors_file_that_is_not_a_checkpoint(capsys, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"json": json.dumps({"format": "pyfastpeft-checkpoint-1"})})
    message = run(capsys, "finetune", *FAST, "--out", tmp_path / "o", "--resume", other)
    assert message.startswith(f"--resume: {other} is a damaged checkpoint (metadata without run, step")


def _config(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    return path


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"steps": "many"}, "steps: expected an integer, got 'many'"),
        ({"steps": 1.5}, "steps: expected an integer, got '1.5'"),
        ({"steps": 0}, "steps: expected an integer >= 1, got 0"),
        ({"batch-size": True}, "batch-size: expected a string or a number, got True"),
        ({"lr": {"value": 1}}, "lr: expected a string or a number, got {'value': 1}"),
        ({"rslora": "yes"}, "rslora: expected true or false, got 'yes'"),
        ({"device": "tpu"}, "device: expected cpu, cuda or cuda:N, got 'tpu'"),
        ({"seed": 2**70}, "seed: expected a seed in [0, 2**63 - 1]"),
        ({"task": "nope"}, "task = 'nope' is not one of"),
        ({"no_such_key": 1}, "unknown key 'no_such_key'"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_key(capsys, tmp_path, values, expected):
    path = _config(tmp_path, values)
    message = run(capsys, "finetune", "--config", path)
    assert message.startswith(f"--config {path}: ") and expected in message


def test_config_values_of_the_right_type_are_used(tmp_path):
    path = _config(tmp_path, {"steps": 3, "lr": 1, "rslora": True, "seed": "5", "target-modules": ["q_proj", "v_proj"]})
    parser = cli.build_parser()
    cli._apply_config(parser._subparsers._group_actions[0].choices["finetune"], str(path))
    args = parser.parse_args(["finetune", "--seed", "7"])
    assert (args.steps, args.lr, args.rslora, args.seed, args.target_modules) == (3, 1.0, True, 7, "q_proj,v_proj")


def _adapter(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("peft_type", "shown"), [("FOO", "'FOO'"), (["LORA"], "['LORA']"), (None, "None"), (3, "3")])
def test_report_and_merge_refuse_an_unknown_peft_type(capsys, tmp_path, peft_type, shown):
    folder = _adapter(tmp_path, {"peft_type": peft_type, "r": 2})
    message = run(capsys, "report", folder)
    assert message.startswith(f"{folder / 'adapter_config.json'}: peft_type {shown} is not supported; expected one of")
    assert "LORA" in message
    assert run(capsys, "merge", "builtin", folder, tmp_path / "merged") == message


def test_missing_data_file(capsys, tmp_path):
    assert run(capsys, "finetune", *FAST, "--data", tmp_path / "none.jsonl").startswith("--data: no such file")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise TypeError("an internal mistake")

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(TypeError, match="an internal mistake"):
        cli.main(["report", "somewhere"])

    def wrong_value(args):
        raise ValueError("not a user error")  # a plain ValueError from inside the library is a bug too

    monkeypatch.setattr(cli, "cmd_report", wrong_value)
    with pytest.raises(ValueError, match="not a user error"):
        cli.main(["report", "somewhere"])


def test_the_command_prints_one_line_and_no_traceback(tmp_path):
    # one run through the real entry point (the cases above run in-process, faster)
    out = python_m_pyfastpeft("report", tmp_path)
    assert out.returncode == 2, out.stderr
    expected = f"{tmp_path}: no adapter_model.safetensors or adapter.safetensors (not an adapter folder)"
    assert out.stderr == f"pyfastpeft: error: {expected}\n"
