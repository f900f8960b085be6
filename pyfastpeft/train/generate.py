"""``pyfastpeft generate``: a base model plus a saved adapter answering prompts, streamed as they come.

The base is ``--base`` (a Hugging Face folder or a .gguf file), else the folder the adapter records
(``finetune`` writes it), else the default SmolLM2-135M-Instruct. Prompts go through the tokenizer's
chat template where it has one; an adapter trained on the dates task gets that task's instruction as the
system turn unless ``--system`` says otherwise. Decoding is greedy (``--temperature 0``, the default) or
sampled with ``--temperature`` and ``--top-p``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError


@dataclass
class GenerateSettings:
    prompts: list[str]
    adapter: Path | None = None  # None: the base alone
    base: str | None = None  # None: the adapter's recorded base, else the default model
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def _check(s: GenerateSettings) -> None:
    if not s.prompts:
        raise UserError("no prompts: give them as arguments or on stdin, one per line")
    if s.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: expected a positive number, got {s.max_new_tokens}")
    if s.temperature < 0:
        raise UserError(f"--temperature: expected 0 (greedy) or a positive number, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise UserError(f"--top-p: expected a probability in (0, 1], got {s.top_p}")
    if s.adapter is not None and not Path(s.adapter).is_dir():
        raise UserError(f"adapter: no such folder: {s.adapter} (pass --no-adapter for the base alone)")


def load_for_generation(s: GenerateSettings, log=print):
    """(model, tokenizer, system prompt): the base with the adapter applied unless ``s.adapter`` is None."""
    from ..models.pretrained import load_pretrained
    from .saved_adapter import read_saved_adapter, rebuild, recorded_base_folder

    saved = read_saved_adapter(s.adapter) if s.adapter is not None else None
    run = saved.run if saved is not None else None
    if run and run.get("builtin"):
        raise UserError(
            f"{s.adapter}: trained on the built-in model (--model tiny), which has no tokenizer to generate text with"
        )
    base = s.base
    if base is None and saved is not None:
        folder = recorded_base_folder(saved)
        base = str(folder) if folder is not None else None
    model, tokenizer, description = load_pretrained(base, log=log)
    if tokenizer is None:
        raise UserError(f"--base {base}: the model folder has no tokenizer")
    log(description)
    if saved is not None:
        model = rebuild(model, saved)
        log(f"adapter: {saved.directory} ({saved.method or saved.peft_type})")
    else:
        log("adapter: none (the base model alone)")
    system = s.system
    if system is None and run and run.get("task") == "dates":
        from .dates import INSTRUCTION

        system = INSTRUCTION
    return model.eval(), tokenizer, system


def _hf_model(model):
    """The Hugging Face model under a PeftModel (its layers are adapted in place), which generates."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "generate") else model


def run_generate(s: GenerateSettings, out=None, log=print) -> list[str]:
    """Streams each answer to ``out`` (stdout) and returns them."""
    from transformers import TextStreamer

    from .dates import chat_prompt_ids

    _check(s)
    out = out or sys.stdout
    model, tokenizer, system = load_for_generation(s, log)
    hf = _hf_model(model)
    answers = []
    for prompt in s.prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt, system)])
        torch.manual_seed(s.seed)
        streamer = _Streamer(tokenizer, out)
        sample = s.temperature > 0
        with torch.no_grad():
            generated = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=s.max_new_tokens,
                do_sample=sample,
                temperature=s.temperature if sample else None,
                top_p=s.top_p if sample else None,
                top_k=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                streamer=streamer.make(TextStreamer, prompt),
            )
        answers.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


class _Streamer:
    """transformers' TextStreamer writing ``> prompt`` then the answer's text to ``out`` as it comes."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out

    def make(self, streamer_class, prompt: str):
        out = self.out

        class Streamer(streamer_class):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        print(f"> {prompt}", file=out, flush=True)
        return Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
