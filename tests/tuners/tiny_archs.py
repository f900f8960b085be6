"""Tiny random-init transformers models of many architectures (hidden 16-32, 1-2 layers, vocab 64; no
downloads), with the task head PEFT pairs them with and matching inputs, for the PEFT parity matrix."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64
SEQ = 6


@dataclass(frozen=True)
class Arch:
    model_type: str
    task_type: str  # PEFT's: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM; "" for vision (no PEFT task type)
    build: Callable[[], torch.nn.Module]
    head: str | None = None  # the module PEFT adds to modules_to_save for the task type

    @property
    def is_seq2seq(self) -> bool:
        return self.task_type == "SEQ_2_SEQ_LM"

    @property
    def is_vision(self) -> bool:
        return self.task_type == ""


def _decoder(cfg_cls: str, model_cls: str, **kw) -> Callable[[], torch.nn.Module]:
    def build():
        return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw))

    return build


_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    num_labels=3,
)

ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "CAUSAL_LM", _decoder("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE)),
    "mistral": Arch("mistral", "CAUSAL_LM", _decoder("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE)),
    "qwen2": Arch("qwen2", "CAUSAL_LM", _decoder("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE)),
    "gemma": Arch("gemma", "CAUSAL_LM", _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_LLAMA_LIKE)),
    "phi3": Arch("phi3", "CAUSAL_LM", _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_LLAMA_LIKE)),
    "gpt2": Arch(
        "gpt2", "CAUSAL_LM", _decoder("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    ),
    "gpt_neox": Arch(
        "gpt_neox",
        "CAUSAL_LM",
        _decoder(
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    ),
    "opt": Arch(
        "opt",
        "CAUSAL_LM",
        _decoder(
            "OPTConfig",
            "OPTForCausalLM",
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    ),
    "bloom": Arch(
        "bloom",
        "CAUSAL_LM",
        _decoder("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    ),
    "falcon": Arch(
        "falcon",
        "CAUSAL_LM",
        _decoder(
            "FalconConfig",
            "FalconForCausalLM",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    ),
    "bert": Arch("bert", "SEQ_CLS", _decoder("BertConfig", "BertForSequenceClassification", **_ENCODER), "classifier"),
    "roberta": Arch(
        "roberta",
        "SEQ_CLS",
        _decoder("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=1, **_ENCODER),
        "classifier",
    ),
    "deberta-v2": Arch(
        "deberta-v2",
        "SEQ_CLS",
        _decoder("DebertaV2Config", "DebertaV2ForSequenceClassification", **_ENCODER),
        "classifier",
    ),
    "distilbert": Arch(
        "distilbert",
        "SEQ_CLS",
        _decoder(
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=48,
            max_position_embeddings=64,
            num_labels=3,
        ),
        "classifier",
    ),
    "t5": Arch(
        "t5",
        "SEQ_2_SEQ_LM",
        _decoder(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
    ),
    "bart": Arch(
        "bart",
        "SEQ_2_SEQ_LM",
        _decoder(
            "BartConfig",
            "BartForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
    ),
    "vit": Arch(
        "vit",
        "",
        _decoder(
            "ViTConfig",
            "ViTForImageClassification",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=8,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        ),
        "classifier",
    ),
}


def twins(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two identical copies of the tiny model, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[name].build().eval()
    return model, copy.deepcopy(model)


def inputs(name: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs: token ids with a left-padded first row (an attention mask with zeros), plus decoder
    inputs for encoder-decoders and pixels for vision models."""
    g = torch.Generator().manual_seed(seed)
    arch = ARCHS[name]
    if arch.is_vision:
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.is_seq2seq:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return out


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
