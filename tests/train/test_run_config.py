"""The training commands' dataclass configs: the command line fills them field for field, with the same
defaults, and the library runs from them without the command line."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from pyfastpeft.cli import build_parser, to_config
from pyfastpeft.train.compare import run_compare
from pyfastpeft.train.config import BenchConfig, CompareConfig, FinetuneConfig
from pyfastpeft.train.finetune import run_finetune
from pyfastpeft.train.methods import METHODS

NOT_SETTINGS = {"help", "config", "func", "command"}  # argparse's own, and the subcommand's dispatch


def _subparser(command: str):
    return build_parser()._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize(
    ("command", "config_class"), [("finetune", FinetuneConfig), ("compare", CompareConfig), ("bench", BenchConfig)]
)
def test_every_flag_fills_a_field_with_the_same_default(command, config_class):
    defaults = config_class()
    dests = [a for a in _subparser(command)._actions if a.dest not in NOT_SETTINGS]
    assert dests
    names = {f.name for f in fields(config_class)}
    for action in dests:
        assert action.dest in names, f"{command} --{action.dest} sets no field of {config_class.__name__}"
        if command == "compare" and action.dest == "methods":
            # the command line spells "every method" out for --help; the dataclass says "" for it
            assert action.default.split(",") == sorted(METHODS) and defaults.methods == ""
            continue
        assert action.default == getattr(defaults, action.dest), f"{command} --{action.dest}"


def test_command_line_values_reach_the_config():
    args = build_parser().parse_args(["finetune", "--method", "dora", "--r", "3", "--rslora", "--seed", "9"])
    config = to_config(FinetuneConfig, args)
    assert (config.method, config.r, config.rslora, config.seed) == ("dora", 3, True, 9)
    assert config.base_folder is None  # filled by a run, never by a flag


def test_finetune_from_python_without_the_command_line(tmp_path):
    # the settings of conftest.TINY, so the pretrained built-in model comes from the shared cache
    tiny = dict(model="tiny", size="small", pretrain_steps=20, length=4, batch_size=8, log_every=1000)
    config = FinetuneConfig(**tiny, method="bitfit", steps=2, out=str(tmp_path / "out"))
    summary = run_finetune(config, log=lambda *a, **k: None, keep_model=True)
    assert summary["exit_code"] == 0 and summary["step"] == 2
    resolved = summary["config"]
    assert (resolved.task, resolved.lr) == ("shift", 3e-2)  # the built-in model's defaults, filled in
    assert (config.task, config.lr) == (None, None)  # the caller's config is left as it was
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["method"] == "bitfit"


def test_from_dict_keeps_defaults_and_ignores_unknown_keys():
    config = FinetuneConfig.from_dict({"method": "ia3", "seed": 4, "written_by_a_newer_version": 1})
    assert (config.method, config.seed, config.r) == ("ia3", 4, None)


def test_compare_passes_keep_freed_memory_to_every_run(monkeypatch, tmp_path):
    from pyfastpeft.train import finetune

    seen = []

    def fake_run(config, log=print, keep_model=False):
        seen.append(config.keep_freed_memory)
        raise RuntimeError("stop after the first run's config")

    monkeypatch.setattr(finetune, "run_finetune", fake_run)
    for flags, want in (([], False), (["--keep-freed-memory"], True)):
        args = build_parser().parse_args(["compare", "--methods", "lora", "--out", str(tmp_path), *flags])
        with pytest.raises(RuntimeError, match="first run"):
            run_compare(to_config(CompareConfig, args))
        assert seen[-1] is want
