"""Training-loop integration: frozen weights stay bit-identical, gradient checkpointing, autocast to
bfloat16 on the CPU, torch.compile(fullgraph=True)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from tests.conftest import low_precision_error_bound
from tests.tuners.hf_tiny_models import llama_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(layers: int = 2) -> TinyLlamaForCausalLM:
    torch.manual_seed(0)
    return TinyLlamaForCausalLM(
        TinyLlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
    )


def ids(b=2, t=9, seed=1):
    return torch.randint(0, 32, (b, t), generator=torch.Generator().manual_seed(seed))


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True])
def test_frozen_parameters_bit_identical_after_training(use_dora):
    m = pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=ALL, lora_dropout=0.1, use_dora=use_dora))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    x = ids()
    for _ in range(3):
        loss = m(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, trainable[n]) for n, p in m.named_parameters() if n in trainable)


class Checkpointed(nn.Module):
    def __init__(self, layer: nn.Module, reentrant: bool):
        super().__init__()
        self.layer, self.reentrant = layer, reentrant

    def forward(self, *args):
        return checkpoint(self.layer, *args, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_utils_checkpoint_gives_the_same_gradients(reentrant):
    plain = pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=ALL, lora_dropout=0.2, init_lora_weights=False))
    ckpt = copy.deepcopy(plain)
    layers = ckpt.base_model.model.model.layers
    for i in range(len(layers)):
        layers[i] = Checkpointed(layers[i], reentrant)
    if reentrant:
        ckpt.enable_input_require_grads()
    x = ids()
    for model in (plain, ckpt):
        torch.manual_seed(5)  # same dropout masks: the recompute replays the RNG state
        model(x, labels=x).loss.backward()
    g_plain = lora_grads(plain)
    g_ckpt = {k.replace(".layer.", "."): v for k, v in lora_grads(ckpt).items()}
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    # the recompute runs the same kernels on the same inputs with the replayed RNG, and the kernels are
    # deterministic within a CPU level: the gradients are bit-identical, not merely close
    for n in g_plain:
        torch.testing.assert_close(g_plain[n], g_ckpt[n], rtol=0, atol=0, msg=n)


def test_transformers_gradient_checkpointing_enable():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = llama_config(vocab_size=32, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg)
    plain = pf.get_peft_model(base, pf.LoraConfig(target_modules=ALL, lora_dropout=0.1, init_lora_weights=False))
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    x = ids()
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(5)
        model(input_ids=x, labels=x).loss.backward()
    g_plain, g_ckpt = lora_grads(plain), lora_grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for n in g_plain:  # bit-identical, as above
        torch.testing.assert_close(g_plain[n], g_ckpt[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("use_dora", [False, True])
def test_autocast_bfloat16_on_cpu(use_dora):
    cfg = dict(target_modules=ALL, use_dora=use_dora, init_lora_weights=False)
    ours = pf.get_peft_model(tiny(), pf.LoraConfig(**cfg)).eval()
    ref64 = copy.deepcopy(ours).double()
    x = ids()
    with torch.no_grad():
        exact = ref64(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x).logits
        # plain PyTorch's bf16 error on the same computation: the merged model under autocast
        merged = copy.deepcopy(ours)
        merged.merge_adapter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch_low = merged(x).logits
    err, bound = low_precision_error_bound(low, torch_low, exact, factor=2.0)
    assert err <= bound, (err, bound)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.train()(x, labels=x).loss.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_torch_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    cfg = pf.LoraConfig(target_modules=ALL, lora_dropout=0.1, init_lora_weights=False, rank_pattern={"v_proj": 2})
    m = pf.get_peft_model(tiny(layers=1), cfg)
    m.add_adapter("dora", pf.LoraConfig(target_modules=["o_proj"], use_dora=True, init_lora_weights=False))
    m.eval()
    x = ids()
    # aot_eager: dynamo must capture the whole graph (fullgraph) and AOT autograd must trace the fake
    # kernels and the backward; inductor codegen would add ~50 s on 2 cores and test nothing of ours.
    # aot_eager runs the traced ATen ops (ours included) eagerly: the same kernels in the same order as
    # the eager model, so the logits are bit-identical
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, m(x).logits, rtol=0, atol=0)
    m.train()
    loss = compiled(x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    m.set_adapter("dora")
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, m(x).logits, rtol=0, atol=0)
