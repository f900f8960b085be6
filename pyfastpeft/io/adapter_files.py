"""Adapters on disk in Hugging Face PEFT's layout.

``<dir>/adapter_model.safetensors`` holds, per adapted module path P (``base_model.model.`` + the path
in the user's model):
    P.lora_A.weight [r, in]   P.lora_B.weight [out, r]   P.lora_magnitude_vector [out] (DoRA)
    P.lora_embedding_A [r, num_embeddings]   P.lora_embedding_B [dim, r]   (nn.Embedding)
    P.base_layer.bias (bias='lora_only'), every bias (bias='all'), and modules_to_save as P.<param>;
    with tie_lora_A / tie_lora_B (not in PEFT): each shared factor once, as
    base_model.model.tied_lora_A.<module name>.weight / tied_lora_B.<module name>.weight;
``<dir>/adapter_config.json`` the LoraConfig with ``peft_type: "LORA"``. The adapter named "default" lives
in ``<dir>``, any other in ``<dir>/<name>``. Pickle files (.bin, .pt) are never read.
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
from torch import nn

from ..errors import UserError
from ..tuners.config import LoraConfig
from ..tuners.inject import lora_layers, save_wrappers
from ..tuners.lora_layers import LoraEmbedding, LoraLinear
from ..tuners.registry import config_from_dict

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PREFIX = "base_model.model."


def adapter_tensors(peft_model, adapter_name: str) -> dict[str, nn.Parameter | torch.Tensor]:
    """The adapter's tensors under their file keys (the live parameters, not copies); every PEFT model
    class says which through its ``adapter_tensors`` method (a TunerModel adds its modules_to_save
    copies)."""
    from ..tuners.base import TunerModel

    out = dict(peft_model.adapter_tensors(adapter_name))
    if isinstance(peft_model, TunerModel):
        out.update(peft_model.modules_to_save_tensors(adapter_name))
    return out


def lora_adapter_tensors(peft_model, adapter_name: str) -> dict[str, nn.Parameter | torch.Tensor]:
    """A LoRA PeftModel's tensors under PEFT's file keys."""
    config = peft_model.peft_config[adapter_name]
    model = peft_model.base_model.model
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        key = PREFIX + path
        if isinstance(layer, LoraLinear):
            # a tied factor is one tensor for every layer of that module name: written once
            group = path.rsplit(".", 1)[-1]
            a_key = f"{PREFIX}tied_lora_A.{group}.weight" if config.tie_lora_A else f"{key}.lora_A.weight"
            b_key = f"{PREFIX}tied_lora_B.{group}.weight" if config.tie_lora_B else f"{key}.lora_B.weight"
            out[a_key] = layer.lora_A[adapter_name].weight
            out[b_key] = layer.lora_B[adapter_name].weight
            if layer.use_dora[adapter_name]:
                out[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
        elif isinstance(layer, LoraEmbedding):
            out[f"{key}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
            out[f"{key}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
        bias = getattr(layer.base_layer, "bias", None)
        if config.bias == "lora_only" and bias is not None:
            out[f"{key}.base_layer.bias"] = bias
    if config.bias == "all":
        for name, p in peft_model.named_bias_parameters():
            out[name] = p
    for path, wrapper in save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{name}"] = t
    return out


def adapter_state_dict(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Detached contiguous copies of the adapter's tensors under PEFT's file keys."""
    return {k: v.detach().contiguous().clone() for k, v in adapter_tensors(peft_model, adapter_name).items()}


def config_json(peft_model, adapter_name: str) -> dict:
    return peft_model.config_json(adapter_name)


def lora_config_json(peft_model, adapter_name: str) -> dict:
    d = peft_model.peft_config[adapter_name].to_dict()
    d["inference_mode"] = True  # as PEFT writes it: the file describes a trained adapter
    base_config = getattr(peft_model.base_model.model, "config", None)
    name = getattr(base_config, "_name_or_path", None) or getattr(base_config, "name_or_path", None)
    if d.get("base_model_name_or_path") is None and name:
        d["base_model_name_or_path"] = name
    return d


def adapter_directory(root: str | os.PathLike, adapter_name: str) -> Path:
    return Path(root) if adapter_name == "default" else Path(root) / adapter_name


def serialize_adapter(peft_model, adapter_name: str) -> tuple[bytes, bytes]:
    """(safetensors bytes, adapter_config.json bytes) exactly as save_pretrained writes them."""
    weights = save_safetensors_bytes(adapter_state_dict(peft_model, adapter_name), metadata={"format": "pt"})
    config = (json.dumps(config_json(peft_model, adapter_name), indent=2, sort_keys=True) + "\n").encode()
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
def read_adapter(directory: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor], Path]:
    """(config, tensors, weights path) of the adapter saved in ``directory``; refuses pickle files."""
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
    config = config_from_dict(raw, str(config_path))
    config._from_file = True  # names PEFT wrote that match nothing warn instead of failing (as in PEFT)
    try:
        tensors = load_safetensors_bytes(weights.read_bytes())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{weights}: not a valid safetensors file ({err})") from None
    return config, tensors, weights


def copy_into(peft_model, adapter_name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Validate every key and shape of ``tensors`` against the model's adapter, then copy them in."""
    expected = adapter_tensors(peft_model, adapter_name)
    # PEFT also saves whole embedding matrices when embeddings are targeted or resized; they load too.
    is_lora = isinstance(peft_model.peft_config[adapter_name], LoraConfig)
    extras = _also_loadable(peft_model, adapter_name) if is_lora else {}
    expected.update({k: extras[k] for k in tensors if k not in expected and k in extras})
    check_and_copy(expected, tensors, source)


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
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
    if problems:
        raise UserError(f"{source} does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(tensors[k].to(dtype=target.dtype, device=target.device))


def _also_loadable(peft_model, adapter_name: str) -> dict[str, torch.Tensor]:
    """Tensors PEFT may write beyond the adapter's own: whole embedding matrices (when embeddings are
    targeted or resized) and, with bias='all', the biases inside modules_to_save wrappers under their
    in-memory names (``P.original_module.bias``, ``P.modules_to_save.bias``)."""
    found = _embedding_parameters(peft_model)
    if peft_model.peft_config[adapter_name].bias == "all":
        for path, wrapper in save_wrappers(peft_model.base_model.model):
            modules = {"original_module": wrapper.original_module}
            if adapter_name in wrapper.modules_to_save:
                modules["modules_to_save"] = wrapper.modules_to_save[adapter_name]
            for label, module in modules.items():
                for name, p in module.named_parameters():
                    if name == "bias" or name.endswith(".bias"):
                        found[f"{PREFIX}{path}.{label}.{name}"] = p
    return found


def _embedding_parameters(peft_model) -> dict[str, torch.Tensor]:
    model = peft_model.base_model.model
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    found = {}
    for path, module in peft_model.named_modules():
        if isinstance(module, nn.Embedding) or (out is not None and module is out):
            for name, p in module.named_parameters(recurse=False):
                found[f"{path}.{name}"] = p
    return found


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _config_for_injection(config: LoraConfig) -> LoraConfig:
    # The saved tensors replace whatever the initialisation makes; PiSSA's would also rewrite the base
    # weights, so loading always injects with the plain initialisation.
    d = config.to_dict()
    d["init_lora_weights"] = True
    inject = LoraConfig.from_dict(d)
    inject._from_file = getattr(config, "_from_file", False)
    return inject


def _check_tied_layout(config: LoraConfig, tensors: dict[str, torch.Tensor], source: Path) -> None:
    for flag, factor in (("tie_lora_A", "lora_A"), ("tie_lora_B", "lora_B")):
        per_layer = [k for k in tensors if k.endswith(f".{factor}.weight")]
        if getattr(config, flag) and per_layer:
            raise UserError(
                f"{source}: the config ties {factor} across layers ({flag}=True), but the file holds one {factor} "
                f"per layer (PEFT's layout, e.g. {per_layer[0]}); a tied adapter stores each shared factor once "
                f"as base_model.model.tied_{factor}.<module name>.weight. Load it with {flag}=False instead"
            )


def load_into_new_model(cls, model: nn.Module, directory, adapter_name: str, is_trainable: bool):
    config, tensors, source = read_adapter(_find_dir(directory, adapter_name))
    _check_tied_layout(config, tensors, source)
    inject_config = _config_for_injection(config)
    inject_config.inference_mode = not is_trainable
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    peft_model = cls(model, inject_config, adapter_name)
    try:
        copy_into(peft_model, adapter_name, tensors, source)
    except BaseException:
        peft_model.unload()  # leave the caller's model as it was
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    peft_model.peft_config[adapter_name].init_lora_weights = config.init_lora_weights
    if not is_trainable:
        peft_model.eval()
    return peft_model


def load_adapter(peft_model, directory, adapter_name: str, is_trainable: bool) -> None:
    config, tensors, source = read_adapter(_find_dir(directory, adapter_name))
    _check_tied_layout(config, tensors, source)
    inject_config = _config_for_injection(config)
    inject_config.inference_mode = not is_trainable
    peft_model.add_adapter(adapter_name, inject_config)
    try:
        copy_into(peft_model, adapter_name, tensors, source)
    except BaseException:
        peft_model.delete_adapter(adapter_name)
        raise
    peft_model.peft_config[adapter_name].init_lora_weights = config.init_lora_weights


def _find_dir(directory, adapter_name: str) -> Path:
    # A directory holding the adapter itself, or a save_pretrained root with it in a subfolder.
    root = Path(directory)
    if adapter_name != "default" and (root / adapter_name / WEIGHTS_NAME).is_file():
        return root / adapter_name
    return root


def peek_peft_type(directory: Path) -> Any:
    """The ``peft_type`` in ``directory``'s adapter_config.json ("LORA" when the file cannot say; reading
    it properly then reports the problem)."""
    try:
        raw = json.loads((Path(directory) / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return "LORA"
    return raw.get("peft_type", "LORA") if isinstance(raw, dict) else "LORA"
