"""``finetune --quantized-base``: a GGUF model trained with its weights kept in the file's blocks; the
first step's loss is the float model's (the same de-quantized weights), the blocks never change, the
adapter is saved over the converted float base, and what it cannot run is refused in one line."""

from __future__ import annotations

import math

import pytest

from pyfastpeft import cli
from pyfastpeft.nn import GGUFLinear
from pyfastpeft.train.config import FinetuneConfig
from pyfastpeft.train.finetune import run_finetune

from ..models.gguf_fixtures import random_hf_state, write_tiny_gguf

pytest.importorskip("transformers")


def run(gguf_path, out, quantized: bool) -> dict:
    config = FinetuneConfig(
        model=str(gguf_path),
        quantized_base=quantized,
        task="shift",
        length=4,
        steps=3,
        batch_size=4,
        eval_every=3,
        log_every=1000,
        seed=1,
        out=str(out),
    )
    return run_finetune(config, log=lambda *a, **k: None, keep_model=True)


def test_lora_trains_over_the_blocks_as_over_the_float_model(tmp_path):
    gguf_path = tmp_path / "base.gguf"
    write_tiny_gguf(gguf_path, random_hf_state(seed=3))
    blocks = run(gguf_path, tmp_path / "blocks", quantized=True)
    floats = run(gguf_path, tmp_path / "float", quantized=False)
    assert blocks["exit_code"] == 0 and floats["exit_code"] == 0
    layers = [m for m in blocks["model"].modules() if isinstance(m, GGUFLinear)]
    assert layers and not any(p.dim() == 2 and not p.requires_grad for p in blocks["model"].parameters())
    # step 1 runs before any update on the same weights: the loss agrees as the logits do (docs/gguf.md:
    # within 1e-4 relative of the float32 de-quantized model, the float32 rounding of the network's sums)
    assert math.isclose(blocks["loss_first"], floats["loss_first"], rel_tol=1e-4)
    assert blocks["loss_last"] < blocks["loss_first"]
    assert (tmp_path / "blocks" / "adapter_model.safetensors").is_file()


def test_the_built_in_model_has_no_blocks(tmp_path, capsys):
    code = cli.main(["finetune", "--model", "tiny", "--quantized-base", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "pyfastpeft: error: --quantized-base: needs a GGUF model (the default or --model FILE.gguf), not --model tiny"
    ]


@pytest.mark.parametrize("method", ["full", "freeze", "sparse", "bitfit", "adapter", "prompt", "qat-lora", "distill"])
def test_methods_that_need_float_weights_are_refused_in_one_line(tmp_path, capsys, method):
    code = cli.main(["finetune", "--quantized-base", "--method", method, "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pyfastpeft: error: --quantized-base: --method {method} needs")
    assert "lora, dora, ia3" in err[0]
