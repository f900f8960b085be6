"""Adapters on disk in Hugging Face PEFT's layout, for any method.

``<dir>/adapter_model.safetensors`` holds the adapter's tensors under the keys the PEFT model gives
(``adapter_tensors``: PEFT's own keys where PEFT has the method), ``<dir>/adapter_config.json`` the
config the PEFT model gives (``config_json``, with ``peft_type``). The adapter named "default" lives in
``<dir>``, any other in ``<dir>/<name>``. Writes are atomic; pickle files (.bin, .pt) are never read.
This package names no method: what a method saves is the tuner's business.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ..errors import UserError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PREFIX = "base_model.model."


def adapter_state_dict(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Detached contiguous copies of the adapter's tensors under PEFT's file keys."""
    return {k: v.detach().contiguous().clone() for k, v in peft_model.adapter_tensors(adapter_name).items()}


def adapter_directory(root: str | os.PathLike, adapter_name: str) -> Path:
    return Path(root) if adapter_name == "default" else Path(root) / adapter_name


def serialize_adapter(peft_model, adapter_name: str) -> tuple[bytes, bytes]:
    """(safetensors bytes, adapter_config.json bytes) exactly as save_pretrained writes them."""
    weights = save_safetensors_bytes(adapter_state_dict(peft_model, adapter_name), metadata={"format": "pt"})
    config = (json.dumps(peft_model.config_json(adapter_name), indent=2, sort_keys=True) + "\n").encode()
    return weights, config


def save_adapters(peft_model, save_directory: str | os.PathLike, selected: list[str] | None = None) -> None:
    """Everything is serialised before the first byte is written; files are written to temporary names
    in their final folder and renamed into place, so a failure leaves no partial file behind."""
    names = list(peft_model.peft_config) if selected is None else list(selected)
    for n in names:
        if n not in peft_model.peft_config:
            raise UserError(f"selected_adapters: no adapter named {n!r}; adapters: {list(peft_model.peft_config)}")
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise UserError(f"save_directory: {root} exists and is not a directory")
    payloads: list[tuple[Path, bytes]] = []
    for n in names:
        weights, config = serialize_adapter(peft_model, n)
        folder = adapter_directory(root, n)
        payloads += [(folder / WEIGHTS_NAME, weights), (folder / CONFIG_NAME, config)]
    atomic_write_all(payloads)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_all(payloads: list[tuple[Path, bytes]]) -> None:
    """Write every file or none: each goes to a temporary name in its final folder, then all are renamed
    into place; if a rename fails, the files already renamed get their previous content back (or are
    removed) and the folders this call created are removed."""
    mode = 0o666 & ~_umask()  # mkstemp creates 0600; give the files the mode open() would
    created: list[Path] = []
    temps: list[tuple[Path, Path]] = []
    replaced: list[tuple[Path, bytes | None]] = []
    try:
        for path, data in payloads:
            missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
            for d in reversed(missing):
                d.mkdir()
                created.append(d)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((Path(tmp), path))
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in temps:
            previous = final.read_bytes() if final.is_file() else None
            os.replace(tmp, final)
            replaced.append((final, previous))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        for final, previous in reversed(replaced):
            with _suppress_oserror():
                if previous is None:
                    final.unlink()
                else:
                    final.write_bytes(previous)
        for d in reversed(created):
            with _suppress_oserror():
                d.rmdir()
        raise


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


# ---- loading --------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(adapter_config.json as a dict, tensors, weights path) of the adapter saved in ``directory``;
    refuses pickle files."""
    path = Path(directory)
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise UserError(
                f"{path}: refusing to read a pickle file (loading it could run arbitrary code); "
                f"convert it to {WEIGHTS_NAME}"
            )
        raise UserError(f"{path}: expected the adapter's directory, not a file")
    if not path.is_dir():
        raise UserError(f"{path}: no such adapter directory")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise UserError(
                f"{path}: found {pickles[0]} but no {WEIGHTS_NAME}; refusing to read a pickle file "
                f"(loading it could run arbitrary code): convert it to safetensors"
            )
        raise UserError(f"{path}: no {WEIGHTS_NAME}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{path}: no {CONFIG_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    try:
        tensors = load_safetensors_bytes(weights.read_bytes())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{weights}: not a valid safetensors file ({err})") from None
    return raw, tensors, weights


def check_and_copy(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``tensors`` into the ``expected`` live tensors after checking that the keys and shapes agree
    exactly; the error lists what is missing, unexpected and mismatched, and nothing is copied then."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: file {list(tensors[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {shorten_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {shorten_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {shorten_list(mismatched)}")
    if problems:
        raise UserError(f"{source} does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(tensors[k].to(dtype=target.dtype, device=target.device))


def shorten_list(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` items joined with commas, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def find_adapter_dir(directory: str | os.PathLike, adapter_name: str) -> Path:
    """``directory`` itself, or its subfolder ``adapter_name`` when it is a save_pretrained root holding
    that adapter there."""
    root = Path(directory)
    if adapter_name != "default" and (root / adapter_name / WEIGHTS_NAME).is_file():
        return root / adapter_name
    return root
