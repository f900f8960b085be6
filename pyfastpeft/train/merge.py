"""``pyfastpeft merge <base> <adapter dir> <out>``: the adapter folded into the base weights.

The adapted model is rebuilt from the base and the adapter, its effective weights (LoRA/DoRA merged,
a sparse delta added, a fake-quantized weight as quantized) are written into a fresh copy of the base
architecture, and that copy is saved: a Hugging Face folder (config.json + model.safetensors, the
tokenizer files copied) for a Hugging Face base, ``model.safetensors`` + ``config.json`` for the
built-in one. Everything is written into a temporary folder next to ``out``, read back, checked on
random inputs against the adapted model, and only then renamed to ``out``: a failure leaves nothing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..io.adapter_files import shorten_list
from ..models import TinyLlamaConfig, TinyLlamaForCausalLM
from ..tuners.effective import effective_weights
from .saved_adapter import load_base_model, read_saved_adapter, rebuild

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
CHECK_BATCH, CHECK_LENGTH = 4, 16


@torch.no_grad()
def merged_state(adapted: nn.Module, template: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The base architecture's state dict with the adapter folded in; refuses a method whose result the
    architecture cannot hold (new tensors such as BitFit's biases on bias-free layers, or prompts)."""
    from ..tuners import PeftModel

    if isinstance(adapted, PeftModel) and adapted.peft_type != "LORA":  # merged by the method's tuner
        merged = adapted.merge_and_unload()
        effective = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items()}
    else:
        inner = adapted.get_base_model() if hasattr(adapted, "get_base_model") else adapted
        effective = effective_weights(inner)
    state = template.state_dict()
    extra = sorted(set(effective) - set(state))
    if extra:
        raise UserError(
            f"merge: method {method} adds tensors the base architecture has no place for "
            f"({shorten_list(extra, 4)}); its adapter cannot be merged into {type(template).__name__}"
        )
    bad = [
        f"{k}: {list(v.shape)} vs base {list(state[k].shape)}"
        for k, v in effective.items()
        if v.shape != state[k].shape
    ]
    if bad:
        raise UserError(f"merge: merged weights do not fit the base ({shorten_list(bad, 4)})")
    return {k: (effective[k].to(v.dtype) if k in effective else v).clone() for k, v in state.items()}


def _check_inputs(model: nn.Module) -> torch.Tensor:
    cfg = model.config
    length = min(CHECK_LENGTH, getattr(cfg, "max_position_embeddings", CHECK_LENGTH))
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (CHECK_BATCH, length), generator=gen)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _write_builtin(folder: Path, model: TinyLlamaForCausalLM, state: dict) -> nn.Module:
    config = {**model.config.to_dict(), "architectures": ["TinyLlamaForCausalLM"], "model_type": "pyfastpeft-tinyllama"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    # read back what was written
    fields = {k: v for k, v in config.items() if k in TinyLlamaConfig.__dataclass_fields__}
    reloaded = TinyLlamaForCausalLM(TinyLlamaConfig(**fields))
    reloaded.load_state_dict(load_file(str(folder / "model.safetensors")))
    return reloaded.eval()


def _write_hf(folder: Path, model: nn.Module, base_folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base_folder / name).is_file() and not (folder / name).exists():
            shutil.copy2(base_folder / name, folder / name)
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32).eval()


def run_merge(base: str, adapter: str | Path, out: str | Path, log=print) -> int:
    """Write the merged model of ``adapter`` on ``base`` (a Hugging Face folder, or "builtin") into the new
    folder ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out: {out} exists and is not an empty folder; choose a new one")
    saved = read_saved_adapter(adapter)
    base_model, description = load_base_model(base, saved, log=lambda *a, **k: None)
    log(f"base: {description}")
    template = copy.deepcopy(base_model)
    adapted = rebuild(base_model, saved)
    method = saved.method or str(saved.peft_type).lower()
    log(f"adapter: {saved.directory} (method {method})")
    state = merged_state(adapted, template, method)
    template.load_state_dict(state)
    template.eval()
    ids = _check_inputs(template)
    expected = _logits(adapted, ids)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if isinstance(template, TinyLlamaForCausalLM):
            reloaded = _write_builtin(tmp, template, state)
        else:
            reloaded = _write_hf(tmp, template, Path(base))
        diff = (_logits(reloaded, ids) - expected).abs().max().item()
        scale = expected.abs().max().item()
        log(
            f"check: max |merged - adapted| logit difference {diff:.3g} over {ids.shape[0]}x{ids.shape[1]} "
            f"random tokens (logits up to {scale:.3g})"
        )
        # float32 rounding of the folded weights; anything larger means the merge is wrong
        if not diff <= 1e-4 * max(1.0, scale):
            raise RuntimeError(f"merge: the merged model's outputs differ from the adapted model's by {diff:.3g}")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    log(f"merged model written to {out} ({files})")
    return 0
