"""A saved adapter merged into its base and written as a GGUF file.

The base is loaded in float32 (the Hugging Face folder a GGUF file converts into), the adapter is
rebuilt on it and folded into the weights exactly as ``merge`` does, and the merged llama weights go to
``write_gguf`` with the base GGUF file as the source of the tokenizer and chat template. The block
quantization is the caller's ``quantize`` (the project's GGUF kernels).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import UserError
from ..models.gguf_writer import QUANTS, Quantize, write_gguf
from ..models.pretrained import CONVERTED_MARK, default_gguf, resolve_folder
from ..ops.gguf import gguf_quantize
from .merge import merged_state
from .saved_adapter import load_base_model, read_saved_adapter, rebuild, recorded_base_folder


def _source_gguf(folder: Path) -> Path | None:
    """The GGUF file a converted folder was made from, when it says so and the file is still there."""
    mark = folder / CONVERTED_MARK
    if not mark.is_file():
        return None
    gguf = Path(json.loads(mark.read_text(encoding="utf-8")).get("gguf", ""))
    return gguf if gguf.is_file() else None


def export_base(base: str | Path | None, recorded: Path | None, log=print) -> tuple[Path, Path]:
    """(the float base's Hugging Face folder, the GGUF file its tokenizer comes from) for ``base``: a
    ``.gguf`` file, a folder converted from one, or None for the base the adapter recorded (the default
    model when it recorded none)."""
    if base is None:
        folder = recorded
        if folder is None:
            folder, _ = resolve_folder(None, log=log)
            return folder, default_gguf()
    elif str(base) in ("tiny", "builtin"):
        raise UserError("base: a GGUF export needs a llama model; the built-in model has no GGUF form")
    else:
        path = Path(base)
        if path.suffix.lower() == ".gguf":
            folder, _ = resolve_folder(path, log=log)
            return folder, path
        folder, _ = resolve_folder(path, log=log)
    source = _source_gguf(folder)
    if source is None:
        raise UserError(
            f"base: {folder} was not converted from a GGUF file here, so there is no GGUF tokenizer to copy; "
            "pass the .gguf file the model came from"
        )
    return folder, source


def default_embedding_quant(quant: str) -> str | None:
    """The token embedding's (and a tied head's) format under ``quant`` when none is asked for: Q8_0 for
    the 4-bit formats, as the source file keeps it; None (the same as ``quant``) otherwise."""
    return "q8_0" if quant in ("q4_0", "q4_1") else None


def export_gguf(
    adapter_dir: str | Path,
    out_path: str | Path,
    quant: str,
    base: str | Path | None = None,
    *,
    quantize: Quantize | None = None,
    embedding_quant: str | None = None,
    log=print,
) -> Path:
    """Writes the adapter in ``adapter_dir`` merged into its base as the GGUF file ``out_path`` in format
    ``quant`` (f16, q8_0, q4_0, q4_1); ``base`` as in ``export_base``; ``quantize`` defaults to the
    project's block quantizer (:func:`pyfastpeft.ops.gguf.gguf_quantize`). Returns ``out_path``."""
    if quantize is None:
        quantize = gguf_quantize
    if quant not in QUANTS:
        raise UserError(f"quant: expected one of {', '.join(QUANTS)}, got {quant!r}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"out: {out_path} is a folder; expected a .gguf file path")
    saved = read_saved_adapter(adapter_dir)
    folder, source = export_base(base, recorded_base_folder(saved), log)
    base_model, description = load_base_model(str(folder), saved, log=lambda *a, **k: None)
    log(f"base: {description} (tokenizer from {source})")
    if getattr(base_model.config, "model_type", None) != "llama":
        raise UserError(f"base: a GGUF export writes llama models; {folder} is {base_model.config.model_type!r}")
    template = copy.deepcopy(base_model)
    adapted = rebuild(base_model, saved)
    method = saved.method or str(saved.peft_type).lower()
    state = merged_state(adapted, template, method)
    write_gguf(
        out_path,
        state,
        template.config,
        quant=quant,
        quantize=quantize,
        source_gguf=source,
        embedding_quant=embedding_quant,
    )
    log(f"GGUF ({quant}) written to {out_path} ({out_path.stat().st_size / 1e6:.1f} MB; adapter {method} merged)")
    return out_path
