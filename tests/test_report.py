"""pyfastpeft.report: counts checked against hand-computed values."""

from __future__ import annotations

import torch

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM


def tiny() -> TinyLlamaForCausalLM:
    torch.manual_seed(0)
    return TinyLlamaForCausalLM(
        TinyLlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
    )


def test_fresh_adapter_changes_nothing():
    m = pf.get_peft_model(tiny(), pf.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    r = pf.report(m)
    trainable = 2 * (4 * (32 + 32) + 4 * (32 + 48))
    assert r.trainable == trainable
    assert r.total == sum(p.numel() for p in m.parameters())
    assert r.changed_entries == 0 and r.max_delta_rank == 0  # B = 0: merging changes nothing
    assert r.optimizer_state_bytes == 2 * 4 * trainable + 4 * 8
    weights, config = pf.io.serialize_adapter(m, "default")
    assert r.adapter_bytes_on_disk == len(weights) + len(config)


def test_trained_adapter_rank_and_changed_entries(tmp_path):
    m = pf.get_peft_model(
        tiny(),
        pf.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["lm_head"]),
    )
    layer0 = m.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer0.lora_B["default"].weight[:, 1:] = 0  # rank 1, every entry still non-zero
        layer0.lora_B["default"].weight[5:, 0] = 0  # rows 5.. of ΔW become zero
        m.base_model.model.lm_head.modules_to_save["default"].weight[2, :7] += 1.0
    r = pf.report(m)
    rows = {mat.name: mat for mat in r.matrices}
    first = rows["base_model.model.model.layers.0.self_attn.q_proj"]
    assert (first.delta_rank, first.changed_entries) == (1, 5 * 32)
    second = rows["base_model.model.model.layers.1.self_attn.q_proj"]
    assert (second.delta_rank, second.changed_entries) == (3, 32 * 32)
    assert r.changed_entries == 5 * 32 + 32 * 32 + 7
    d = r.to_dict()
    assert d["changed_entries"] == r.changed_entries and d["max_delta_rank"] == 3
    table = str(r)
    assert "changed by merging" in table and "rank ΔW" in table and "layers.0.self_attn.q_proj" in table
    m.save_pretrained(tmp_path)
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert r.adapter_bytes_on_disk == on_disk


def test_report_is_the_same_after_merge():
    m = pf.get_peft_model(tiny(), pf.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
    before = pf.report(m)
    m.merge_adapter()
    after = pf.report(m)
    assert [(x.delta_rank, x.changed_entries) for x in before.matrices] == [
        (x.delta_rank, x.changed_entries) for x in after.matrices
    ]
    assert before.matrices[0].delta_rank == 32  # DoRA rescales every row: ΔW is full rank


def test_factored_rank_equals_full_matrix_rank():
    m = pf.get_peft_model(
        tiny(), pf.LoraConfig(r=6, target_modules=["gate_proj", "embed_tokens"], init_lora_weights=False)
    )
    with torch.no_grad():
        emb = m.base_model.model.model.embed_tokens
        emb.lora_embedding_A["default"][4:] = 0  # rank 4
        gate = m.base_model.model.model.layers[1].mlp.gate_proj
        gate.lora_A["default"].weight[3] = 2 * gate.lora_A["default"].weight[0]  # rank 5
    r = pf.report(m)
    for path, layer in pf.tuners.lora.model.lora_layers(m):
        full = int(torch.linalg.matrix_rank(layer.delta_weight("default")))
        assert next(x.delta_rank for x in r.matrices if x.name == path) == full
    ranks = {x.name.rsplit("model.", 1)[-1]: x.delta_rank for x in r.matrices}
    assert ranks["embed_tokens"] == 4 and ranks["layers.1.mlp.gate_proj"] == 5 and ranks["layers.0.mlp.gate_proj"] == 6
