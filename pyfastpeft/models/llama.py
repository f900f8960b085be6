"""A small Llama-shaped decoder (RMSNorm, rotary positions, SwiGLU, q/k/v/o/gate/up/down projections).

Module names follow Hugging Face's Llama (``model.layers.0.self_attn.q_proj``, ``mlp.gate_proj``, ...),
so the same target patterns work on it and on transformers models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 64
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head dimension (hidden_size / num_attention_heads) must be even for rotary positions")

    def to_dict(self) -> dict:
        return asdict(self)


# One layer's cached keys and values, each [B, H, L, head_dim] (keys already rotated).
KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: tuple[KeyValue, ...] | None = None  # per layer, when use_cache=True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotary_tables(head_dim: int, positions: torch.Tensor, theta: float, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [..., T, head_dim/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past_kv: KeyValue | None = None,
        cache_out: list[KeyValue] | None = None,
    ) -> torch.Tensor:
        """``past_kv``: keys/values of earlier positions (a KV cache or a prefix), attended before ``x``'s
        own; ``cache_out`` (a list) receives this call's full keys/values, past included."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_tables(self.head_dim, positions, self.theta, q.dtype)
        cos, sin = cos[:, None], sin[:, None]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
        if cache_out is not None:
            cache_out.append((k, v))
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, attn_mask, past_kv=None, cache_out=None):
        if past_kv is None and cache_out is None:  # the call modules wrapping self_attn have always seen
            x = x + self.self_attn(self.input_layernorm(x), positions, attn_mask)
        else:
            x = x + self.self_attn(self.input_layernorm(x), positions, attn_mask, past_kv, cache_out)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlamaModel(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TinyLlamaForCausalLM(nn.Module):
    """``model(input_ids, attention_mask=None, labels=None)`` → :class:`CausalLMOutput`.

    ``attention_mask`` is [B, T] with 1 for real tokens and 0 for padding; labels equal to -100 are
    ignored by the loss, which predicts token t+1 from tokens ≤ t.
    """

    def __init__(self, cfg: TinyLlamaConfig | None = None):
        super().__init__()
        self.config = cfg or TinyLlamaConfig()
        self.model = TinyLlamaModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: tuple[KeyValue, ...] | list[KeyValue] | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """``past_key_values``: per layer (k, v) [B, H, L, head_dim] of L earlier positions (a KV cache,
        or a learned prefix); the new tokens attend to them, and ``attention_mask`` then covers all
        L + T positions. Without ``position_ids`` the new tokens sit at positions L … L+T-1, so rotary
        positions continue after the cache. ``use_cache=True`` returns the keys/values of all L + T
        positions in ``.past_key_values``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past = self._check_past(past_key_values, b, x.device)
        length = past + t
        if length > self.config.max_position_embeddings:
            what = f"sequence length {t}" if past == 0 else f"cached {past} + new {t} positions"
            raise ValueError(f"{what} exceeds max_position_embeddings ({self.config.max_position_embeddings})")
        if position_ids is None:
            positions = torch.arange(past, length, device=x.device).expand(b, t)
        else:
            if position_ids.shape != (b, t):
                raise ValueError(f"position_ids: expected shape {[b, t]}, got {list(position_ids.shape)}")
            positions = position_ids
        attn_mask = self._attention_mask(attention_mask, b, t, past, x.device)
        cache: list[KeyValue] | None = [] if use_cache else None
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, attn_mask, None if past_key_values is None else past_key_values[i], cache)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=None if cache is None else tuple(cache))

    def _check_past(self, past_key_values, batch: int, device: torch.device) -> int:
        if past_key_values is None:
            return 0
        n_layers = self.config.num_hidden_layers
        if not isinstance(past_key_values, (tuple, list)) or len(past_key_values) != n_layers:
            raise ValueError(f"past_key_values: expected a tuple of {n_layers} per-layer (key, value) pairs")
        heads = self.config.num_attention_heads
        head_dim = self.config.hidden_size // heads
        k0 = past_key_values[0][0]
        for i, kv in enumerate(past_key_values):
            if len(kv) != 2:
                raise ValueError(f"past_key_values[{i}]: expected a (key, value) pair")
            for name, tensor in zip(("key", "value"), kv, strict=True):
                if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[1] != heads:
                    raise ValueError(
                        f"past_key_values[{i}] {name}: expected [{batch}, {heads}, L, {head_dim}], "
                        f"got {list(tensor.shape)}"
                    )
                if tensor.shape[2:] != k0.shape[2:] or tensor.shape[3] != head_dim:
                    raise ValueError(
                        f"past_key_values[{i}] {name}: expected [{batch}, {heads}, {k0.shape[2]}, {head_dim}], "
                        f"got {list(tensor.shape)}"
                    )
                if tensor.device != device:
                    raise ValueError(f"past_key_values[{i}] {name}: on {tensor.device}, the inputs on {device}")
        return k0.shape[2]

    @staticmethod
    def _attention_mask(attention_mask, b: int, t: int, past: int, device) -> torch.Tensor | None:
        """[B, 1, T, L+T] boolean: query i (absolute position L+i) sees key j ≤ L+i whose mask is 1."""
        if attention_mask is None and past == 0:
            return None  # the plain causal case: SDPA's is_causal path
        length = past + t
        causal = torch.ones(t, length, dtype=torch.bool, device=device).tril(diagonal=past)
        if attention_mask is None:
            return causal[None, None].expand(b, 1, t, length)
        if attention_mask.shape != (b, length):
            cover = f"the {past} cached + {t} new positions" if past else f"the {t} positions"
            raise ValueError(
                f"attention_mask: expected shape {[b, length]} ({cover}), got {list(attention_mask.shape)}"
            )
        keep = attention_mask.to(device).bool()
        mask = (causal[None] & keep[:, None, :])[:, None]
        # a fully padded query row would give NaN; let each query attend to itself
        own = torch.zeros(t, length, dtype=torch.bool, device=device)
        own[:, past:] = torch.eye(t, dtype=torch.bool, device=device)
        return mask | own

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        attention_mask: torch.Tensor | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        past_key_values: tuple[KeyValue, ...] | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids`` [B, T] followed by up to ``max_new_tokens`` generated tokens, [B, T + new].

        Greedy unless ``do_sample`` (softmax(logits / temperature), optionally over the ``top_k`` best).
        ``attention_mask`` [B, T] (or [B, L + T'] with a ``past_key_values`` prefix of L positions) marks
        padding, left padding included: positions count real tokens only. ``inputs_embeds`` [B, T', D]
        replaces the embedded prompt in the first step (virtual tokens prepended, for instance); the
        result still starts with ``input_ids``. ``use_cache=False`` recomputes the whole sequence at each
        step (the reference the KV cache must match). Rows that produced ``eos_token_id`` continue with
        ``pad_token_id``; generation stops early when every row has."""
        return generate_tokens(
            self,
            input_ids,
            max_new_tokens,
            attention_mask,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
            use_cache=use_cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """[B, V] logits of the last position → [B] token ids."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate_tokens(
    model: TinyLlamaForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator | None,
    use_cache: bool,
    past_key_values,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, length], got shape {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    b, device = input_ids.shape[0], input_ids.device
    prefix = 0 if past_key_values is None else past_key_values[0][0].shape[2]
    first = model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    if first.shape[0] != b:
        raise ValueError(f"inputs_embeds: expected batch {b}, got {first.shape[0]}")
    t_first = first.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(b, prefix + t_first, dtype=torch.long, device=device)
    if attention_mask.shape != (b, prefix + t_first):
        raise ValueError(f"attention_mask: expected shape {[b, prefix + t_first]}, got {list(attention_mask.shape)}")
    mask = attention_mask.long()
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    cache = past_key_values
    step_embeds = first
    for _ in range(max_new_tokens):
        # a position counts the real (unpadded) tokens before it, so left padding does not shift them
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if use_cache:
            width = step_embeds.shape[1]
            out = model(
                inputs_embeds=step_embeds,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                position_ids=positions[:, -width:],
            )
            cache = out.past_key_values
        else:
            embeds = first
            if new_tokens:
                embeds = torch.cat([first, model.model.embed_tokens(torch.stack(new_tokens, 1))], dim=1)
            out = model(
                inputs_embeds=embeds,
                attention_mask=mask,
                past_key_values=past_key_values,
                position_ids=positions[:, prefix:],
            )
        token = next_token(out.logits[:, -1], do_sample, temperature, top_k, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= token == eos_token_id
        new_tokens.append(token)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        step_embeds = model.model.embed_tokens(token[:, None])
        if eos_token_id is not None and bool(finished.all()):
            break
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, 1)], dim=1)
