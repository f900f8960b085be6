"""A causal language model's next-token loss with its head fused into the loss.

``causal_lm_loss(model, labels, **inputs)`` returns what ``model(**inputs, labels=labels).loss`` returns
(the labels shifted by one position, tokens labelled ``ignore_index`` left out, the mean over the rest),
but runs only the model's backbone and hands the last hidden states and the head's weight to
:func:`pyfastpeft.ops.fused_linear_cross_entropy`: the logits are made a chunk of rows at a time and
turned into their gradient at once, so the four logits-sized tensors of the unfused head and loss
(logits, log-softmax and their two gradients: 4 × 100 MB at 512 tokens of a 49k vocabulary in float32)
are never allocated. It works through a pyfastpeft or Hugging Face ``PeftModel`` whose adapters sit
inside the base model (LoRA and the other layer methods).

Where the head cannot be fused the model's own forward computes the loss, the same value: a model type
whose forward changes the logits after the head (soft-capping, scaling) or is not known, a head that is
not a plain bias-free ``nn.Linear`` (an adapted or saved head, a quantized one), prompt learning (its
virtual tokens go through the wrapper's forward).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import fused_linear_cross_entropy

# transformers model types whose causal-LM forward is exactly `loss(lm_head(backbone(...)[0]), labels)`
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "starcoder2"})


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, head) of ``model`` when :func:`causal_lm_loss` can fuse its head into the loss, else None."""
    lm = model
    if hasattr(lm, "get_base_model"):  # a PeftModel, pyfastpeft's or Hugging Face's
        # prompt learning: the prompt encoder sits on the PeftModel (Hugging Face) or its tuner (pyfastpeft)
        tuner = lm._modules.get("base_model")
        if "prompt_encoder" in lm._modules or (tuner is not None and "prompt_encoder" in tuner._modules):
            return None
        lm = lm.get_base_model()
    # a base whose calls a prompt-learning tuner routes through its virtual tokens, or whose forward was
    # replaced on the instance: running its backbone directly would skip that
    if "prompt_encoder" in lm._modules or "forward" in vars(lm):
        return None
    if getattr(getattr(lm, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or head.bias is not None or not isinstance(backbone, nn.Module):
        return None
    return backbone, head


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The target of each position: the next position's label, ``ignore_index`` after the last one."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def causal_lm_loss(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 0,
    num_items_in_batch: int | torch.Tensor | None = None,
    **inputs,
) -> torch.Tensor:
    """``model(**inputs, labels=labels).loss`` with the head fused into the loss (see the module's doc).

    Args:
        model: a transformers causal LM, or a PeftModel over one.
        labels: ``[batch, seq]`` token ids, ``ignore_index`` where a token is not a target; not shifted
            (as transformers takes them).
        ignore_index: the label of positions left out of the loss. Only transformers' -100 where the
            head cannot be fused (the model's own loss knows no other).
        chunk_size: rows of logits made at a time; 0 picks about 2²³ logits per chunk, whole 32-row blocks.
        num_items_in_batch: as transformers takes it (gradient accumulation): the loss is the sum over
            the labelled tokens divided by this count instead of their mean.
        inputs: the model's inputs (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ...).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise ValueError(f"labels: expected a [batch, seq] tensor of token ids, got {labels!r}")
    parts = fused_head(model)
    if parts is None:
        if ignore_index != -100:
            raise ValueError(
                f"ignore_index: this model's head cannot be fused (pf.lm_loss.fused_head), and its own loss "
                f"ignores the label -100 only, got {ignore_index}"
            )
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(**inputs, labels=labels, **extra).loss
    backbone, head = parts
    hidden = backbone(**inputs)[0]
    targets = shift_labels(labels, ignore_index)
    loss = fused_linear_cross_entropy(hidden, head.weight, targets, ignore_index=ignore_index, chunk_size=chunk_size)
    if num_items_in_batch is not None:
        loss = loss * ((targets != ignore_index).sum().to(loss.dtype) / num_items_in_batch)
    return loss
