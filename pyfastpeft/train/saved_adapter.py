"""A saved adapter folder, read back: its files checked, its method identified, the adapted model rebuilt.

Two layouts exist:
  - Hugging Face PEFT's (``adapter_model.safetensors`` + ``adapter_config.json`` with a ``peft_type``),
    written by every method whose model has ``save_pretrained`` (every PeftModel: all methods but
    full); ``finetune`` adds ``pyfastpeft_run.json`` saying which method and base.
  - pyfastpeft's own (``adapter.safetensors`` + ``adapter_config.json`` with a ``method``): the
    trainable tensors by their names in the adapted model, plus the tensors the method added that do
    not train (``buffers``: a sparse delta's indices).

Rebuilding always goes the same way: the base model, then the method's ``apply`` with the saved knobs
and seed, then the saved tensors copied in after every key and shape was checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from ..errors import UserError
from ..io.adapter_files import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, check_and_copy
from .base import builtin_model, hf_model
from .checkpoint import RUN_INFO_NAME, trainable_state
from .config import FinetuneConfig
from .methods import apply_method

OWN_WEIGHTS_NAME = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class SavedAdapter:
    directory: Path
    layout: str  # "peft" or "pyfastpeft"
    config: dict  # adapter_config.json
    run: dict | None  # method, knobs, seed, base (None for an adapter finetune did not write)
    tensors: dict[str, torch.Tensor]
    weights: Path

    @property
    def method(self) -> str | None:
        return self.run["method"] if self.run else None

    @property
    def peft_type(self) -> str | None:
        return self.config.get("peft_type") if self.layout == "peft" else None

    @property
    def bytes_on_disk(self) -> int:
        names = [self.weights.name, CONFIG_NAME] + (
            [RUN_INFO_NAME] if (self.directory / RUN_INFO_NAME).is_file() else []
        )
        return sum((self.directory / n).stat().st_size for n in names if (self.directory / n).is_file())

    @property
    def buffers(self) -> list[str]:
        return list(self.config.get("buffers", [])) if self.layout == "pyfastpeft" else []

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k not in set(self.buffers)}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _check_peft_type(peft_type: object, source: Path) -> None:
    from ..tuners import peft_types

    known = peft_types()
    if not isinstance(peft_type, str) or peft_type not in known:
        raise UserError(f"{source}: peft_type {peft_type!r} is not supported; expected one of {', '.join(known)}")


def read_saved_adapter(directory: str | Path) -> SavedAdapter:
    """Check and read an adapter folder; every problem is a ValueError naming the file."""
    path = Path(directory)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(
                f"{path}: refusing to read a pickle file (loading it could run arbitrary code); "
                "give an adapter folder with safetensors weights"
            )
        raise UserError(f"{path}: expected an adapter folder, not a file")
    if not path.is_dir():
        raise UserError(f"{path}: no such adapter folder")
    if (path / WEIGHTS_NAME).is_file():
        weights, layout = path / WEIGHTS_NAME, "peft"
    elif (path / OWN_WEIGHTS_NAME).is_file():
        weights, layout = path / OWN_WEIGHTS_NAME, "pyfastpeft"
    else:
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise UserError(
                f"{path}: found {pickles[0]} but no {WEIGHTS_NAME}; refusing to read a pickle file "
                "(loading it could run arbitrary code): convert it to safetensors"
            )
        raise UserError(f"{path}: no {WEIGHTS_NAME} or {OWN_WEIGHTS_NAME} (not an adapter folder)")
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path}: no {CONFIG_NAME}")
    config = _read_json(path / CONFIG_NAME)
    if layout == "peft":
        if "peft_type" not in config:
            raise UserError(f"{path / CONFIG_NAME}: no peft_type (expected Hugging Face PEFT's layout)")
        _check_peft_type(config["peft_type"], path / CONFIG_NAME)
        run = _read_json(path / RUN_INFO_NAME) if (path / RUN_INFO_NAME).is_file() else None
    else:
        if "method" not in config:
            raise UserError(f"{path / CONFIG_NAME}: no method (expected pyfastpeft's adapter layout)")
        run = config
    try:
        tensors = load_safetensors_bytes(weights.read_bytes())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{weights}: not a valid safetensors file ({err})") from None
    if not tensors:
        raise UserError(f"{weights}: holds no tensors")
    return SavedAdapter(path, layout, config, run, tensors, weights)


def run_arguments(run: dict) -> FinetuneConfig:
    """The finetune settings the adapter was made with: the defaults, then the saved values (knobs a
    newer method added and an older file lacks keep their defaults)."""
    values = {k: v for k, v in run.items() if k not in ("builtin", "base_model", "buffers")}
    return FinetuneConfig.from_dict({**values, **(run.get("builtin") or {})})


def recorded_base_folder(saved: SavedAdapter) -> Path | None:
    """The Hugging Face model folder the adapter says it was trained on (the run's ``base_model``, or
    PEFT's ``base_model_name_or_path``) when that folder still exists here; None otherwise."""
    name = saved.run.get("base_model") if saved.run else saved.config.get("base_model_name_or_path")
    if not name or str(name).startswith("builtin:"):
        return None
    folder = Path(name).expanduser()
    return folder if (folder / "config.json").is_file() else None


def load_base_model(base: str | None, saved: SavedAdapter, log=print) -> tuple[nn.Module, str]:
    """(model, description): ``base`` a Hugging Face folder, ``"builtin"``, or None for the base the
    adapter names (the built-in model only; see recorded_base_folder for a folder)."""
    run = saved.run
    if base in (None, "builtin"):
        builtin = run.get("builtin") if run else None
        if not builtin:
            where = f"was trained on {run['base_model']}" if run else "does not say which base it was trained on"
            if base is None:
                raise UserError(f"{saved.directory}: the adapter {where}; pass --base <model folder>")
            raise UserError(
                f"base builtin: the adapter in {saved.directory} {where}; only adapters trained on the built-in "
                "model fit it"
            )
        config = run_arguments(run)
        return builtin_model(config, log), f"built-in model ({run['base_model']})"
    folder = Path(base)
    try:
        model = hf_model(folder, run.get("seed", 0) if run else 0)
    except ValueError as err:
        raise UserError(str(err).replace("--model", "base")) from None
    return model, f"Hugging Face model {folder} ({type(model).__name__})"


def rebuild(base_model: nn.Module, saved: SavedAdapter) -> nn.Module:
    """The adapted model (in eval mode) with the saved tensors in it. A file that does not fit the base
    raises a ValueError listing the missing, unexpected and mis-shaped keys."""
    if saved.run is None:  # a PEFT adapter from elsewhere: its peft_type picks the class
        from ..tuners import PeftModel

        return PeftModel.from_pretrained(base_model, saved.directory).eval()
    config = run_arguments(saved.run)
    torch.manual_seed(config.seed)
    try:
        adapted = apply_method(config.method, base_model, config)
    except ValueError as err:
        raise UserError(f"{saved.directory} does not fit the base: method {config.method}: {err}") from None
    if saved.layout == "peft":
        adapted.load_adapter_tensors("default", saved.tensors, saved.weights)
    else:
        expected = dict(trainable_state(adapted))
        buffers = dict(adapted.named_buffers())
        expected.update({k: buffers[k] for k in saved.buffers if k in buffers})
        check_and_copy(expected, saved.tensors, saved.weights)
    return adapted.eval()
