"""Prompt tuning, P-tuning and prefix tuning on a causal LM: the built-in TinyLlama or a Hugging Face
decoder, behaving as Hugging Face PEFT's ``PeftModelForCausalLM`` does.

For an input of T tokens and P virtual tokens:
  prompt tuning / P-tuning   inputs_embeds = [prompt (P rows); embed(input_ids)], attention mask
                             [1…1; mask], labels [-100…; labels]; the logits cover all P + T positions
                             (as PEFT returns them), and the real tokens sit at positions P … P+T-1.
  prefix tuning              each layer's attention sees P learned (key, value) pairs before the
                             tokens' own, passed as ``past_key_values`` (a tuple of per-layer (k, v)
                             [B, H, P, D] for the built-in model, a transformers DynamicCache for
                             Hugging Face models); the attention mask gains P ones; the logits cover
                             the T real positions, which rotary embeddings place at P … P+T-1 as a cache
                             of P positions does.
Saved as PEFT saves it: ``prompt_embeddings``, the *computed* table — [P, token_dim], or [P, num_layers ·
2 · token_dim] for prefix tuning.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from ...nn.prompt_encoders import PrefixEncoder, PromptEmbedding, PromptEncoder, repeat_to_length
from ..base import BaseTuner
from .config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig

TABLE_KEY = "prompt_embeddings"


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.PreTrainedModel)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return d.get("text_config") or d


def _first(d: dict[str, Any], *names: str) -> Any:
    return next((d[n] for n in names if d.get(n) is not None), None)


def fill_model_fields(config: PromptLearningConfig, model: nn.Module) -> None:
    """Set the config's model-shape fields left at None from the model's config, as PEFT's
    ``_prepare_prompt_learning_config`` does (including its grouped-query rule for prefix tuning)."""
    d = _config_dict(model)
    for field_name, keys in (
        ("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
        ("token_dim", ("hidden_size", "n_embd", "d_model")),
        ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")),
    ):
        if getattr(config, field_name) is None:
            # PEFT reads the layer count from the config attribute first (aliases such as BART's included)
            value = getattr(getattr(model, "config", None), "num_hidden_layers", None)
            if field_name != "num_layers" or not isinstance(value, int):
                value = _first(d, *keys)
            if value is None:
                raise ValueError(f"{field_name}: the model's config does not say it; set it in the config")
            setattr(config, field_name, value)
    if isinstance(config, PrefixTuningConfig) and d.get("num_key_value_heads") is not None:
        head_dim = d.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * d["num_key_value_heads"]
        config.num_attention_heads = d["num_key_value_heads"]
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a KV cache: transformers 5 calls it ``cache``
    (still accepting ``past_key_values``), the built-in model and older code ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if emb is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"model: {type(model).__name__} has no input embeddings (get_input_embeddings() returning an "
            f"embedding layer); prompt tuning and P-tuning prepend virtual tokens to them"
        )
    return emb


class PromptLearningModel(BaseTuner):
    """A causal LM with prompt-learning adapters (all of one method); ``forward`` and ``generate`` add
    the active adapter's virtual tokens. ``prompt_encoder[name]`` holds each adapter's encoder."""

    # PEFT keys a prompt-learning adapter's modules_to_save one level up: ``base_model.<path>.<param>``
    saved_module_prefix = "base_model."

    # ---- hooks ------------------------------------------------------------------------------------
    def _inject(self, name: str, config: PromptLearningConfig) -> None:
        model = self.model
        is_prefix = isinstance(config, PrefixTuningConfig)
        word_embeddings = None if is_prefix else input_embeddings(model)
        if is_prefix:
            if cache_argument(model) is None:
                raise ValueError(
                    f"model: {type(model).__name__}.forward takes no past_key_values (or cache), so its attention "
                    f"cannot take the learned key/value prefixes of prefix tuning"
                )
            if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                raise ValueError("model: prefix tuning does not work with gradient checkpointing")
        fill_model_fields(config, model)
        context = _first(_config_dict(model), "max_position_embeddings", "n_positions", "n_ctx")
        if context is not None and config.num_virtual_tokens >= context:
            raise ValueError(
                f"num_virtual_tokens: {config.num_virtual_tokens} virtual tokens leave no room for the input in "
                f"the model's context of {context} positions (max_position_embeddings)"
            )
        encoder = self._build_encoder(config, word_embeddings, model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict()
        self.prompt_encoder[name] = encoder.to(device)

    @staticmethod
    def _build_encoder(config, word_embeddings, model) -> nn.Module:
        p, dim = config.num_virtual_tokens, config.token_dim
        if not isinstance(config, PrefixTuningConfig):
            p *= config.num_transformer_submodules  # PEFT's table: one block of P rows per submodule
        table_only = config.inference_mode  # PEFT builds only the table when it will not train
        if isinstance(config, PromptTuningConfig):
            init = None
            if config.prompt_tuning_init != "RANDOM" and not table_only:
                vocab = word_embeddings.weight.shape[0]
                if config.prompt_tuning_init == "SAMPLE_VOCAB":
                    ids = torch.randint(0, vocab, (p,)).tolist()
                else:
                    ids = config.prompt_tuning_init_token_ids
                    if ids is None:
                        ids = _tokenize(config)
                    bad = [i for i in ids if i >= vocab]
                    if bad:
                        raise ValueError(
                            f"prompt_tuning_init_token_ids: ids {bad[:5]} are out of range for a vocabulary of {vocab}"
                        )
                    if not ids:
                        raise ValueError("prompt_tuning_init_text: tokenizes to no tokens")
                    ids = repeat_to_length(list(ids), p)
                index = torch.tensor(ids, dtype=torch.long, device=word_embeddings.weight.device)
                with torch.no_grad():
                    init = word_embeddings(index).float()
            if word_embeddings.weight.shape[1] != dim:
                raise ValueError(
                    f"token_dim: {dim} does not match the model's embedding width {word_embeddings.weight.shape[1]}"
                )
            return PromptEmbedding(p, dim, init)
        if isinstance(config, PromptEncoderConfig):
            if word_embeddings.weight.shape[1] != dim:
                raise ValueError(
                    f"token_dim: {dim} does not match the model's embedding width {word_embeddings.weight.shape[1]}"
                )
            return PromptEncoder(
                p,
                dim,
                config.encoder_hidden_size,
                config.encoder_reparameterization_type,
                config.encoder_num_layers,
                config.encoder_dropout,
                table_only=table_only,
            )
        if config.token_dim % config.num_attention_heads:
            raise ValueError(
                f"token_dim: {config.token_dim} is not divisible by num_attention_heads ({config.num_attention_heads})"
            )
        return PrefixEncoder(
            p,
            dim,
            config.num_layers,
            config.encoder_hidden_size,
            config.prefix_projection,
            config.init_weights,
            table_only=table_only,
        )

    def _remove(self, name: str) -> None:
        del self.prompt_encoder[name]

    def _activate(self, names: list[str]) -> None:
        self.__dict__["_prompt_active"] = list(names)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if self._is_table(name):
            return {TABLE_KEY: self.prompt_encoder[name].embedding.weight}
        with torch.no_grad():
            return {TABLE_KEY: self.prompt_table(name)}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.prompt_encoder[name].parameters())

    def _prepare_load(self, name: str) -> None:
        # The file holds the computed table; a reparameterised encoder cannot be recovered from it, so
        # the adapter becomes its table (trainable when loaded with is_trainable), giving the saved outputs.
        if not self._is_table(name):
            config = self.peft_config[name]
            encoder = self._build_encoder_table_only(config)
            self.prompt_encoder[name] = encoder.to(self.prompt_encoder[name].embedding.weight.device)

    def _build_encoder_table_only(self, config) -> nn.Module:
        p, dim = config.num_virtual_tokens, config.token_dim
        if isinstance(config, PrefixTuningConfig):
            return PrefixEncoder(p, dim, config.num_layers, config.encoder_hidden_size, table_only=True)
        return PromptEncoder(p * config.num_transformer_submodules, dim, dim, table_only=True)

    # ---- the virtual tokens -----------------------------------------------------------------------
    def _is_table(self, name: str) -> bool:
        enc = self.prompt_encoder[name]
        if isinstance(enc, PromptEmbedding):
            return True
        if isinstance(enc, PromptEncoder):
            return enc.table_only
        return not enc.prefix_projection

    def prompt_table(self, name: str | None = None) -> torch.Tensor:
        """The adapter's table [P, token_dim] (prefix tuning: [P, num_layers · 2 · token_dim]), what
        PEFT saves as ``prompt_embeddings``."""
        enc = self.prompt_encoder[name or self.active_adapter]
        index = torch.arange(enc.embedding.weight.shape[0], device=enc.embedding.weight.device)
        return enc(index[None])[0]

    def _active(self) -> str | None:
        active = self.__dict__.get("_prompt_active", [])
        return active[0] if active else None

    def get_prompt(self, batch_size: int) -> Any:
        """The active adapter's virtual tokens for a batch: [B, P, token_dim] embeddings, or for prefix
        tuning the per-layer (key, value) prefixes in the form the base model's forward takes."""
        name = self._active()
        config = self.peft_config[name]
        table = self.prompt_table(name)
        if not isinstance(config, PrefixTuningConfig):
            return table[None].expand(batch_size, -1, -1)
        model = self.model
        dtype = next((p.dtype for p in model.parameters()), table.dtype)
        p, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        kv = table.to(dtype)[None].expand(batch_size, -1, -1)
        kv = kv.reshape(batch_size, p, 2 * layers, heads, config.token_dim // heads)
        if config.num_transformer_submodules == 2:
            return _encoder_decoder_prefix(kv, layers)
        kv = kv.permute(2, 0, 3, 1, 4)
        pairs = tuple((kv[2 * i], kv[2 * i + 1]) for i in range(layers))
        if _is_transformers_model(model):
            from transformers import DynamicCache

            return DynamicCache(pairs)
        return pairs

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        with self._base_runs_plain():
            return self._forward(input_ids, attention_mask, labels, inputs_embeds, **kwargs)

    @contextlib.contextmanager
    def _base_runs_plain(self):
        # inside this model's own forward/generate, calls to the base model are the base model's own
        # even when route_base_calls routed them through this model
        routing = self.__dict__.get("_routing", False)
        self.__dict__["_routing"] = True
        try:
            yield
        finally:
            self.__dict__["_routing"] = routing

    def _forward(self, input_ids, attention_mask, labels, inputs_embeds, **kwargs):
        model = self.model
        name = self._active()
        if name is None:
            return model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, inputs_embeds=inputs_embeds, **kwargs
            )
        config = self.peft_config[name]
        p = config.num_virtual_tokens
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]

        def with_prompt_mask(mask):
            return None if mask is None else torch.cat([mask.new_ones(batch, p), mask], dim=1)

        self._adjust_kwargs(config, kwargs)
        if isinstance(config, PrefixTuningConfig):
            if config.task_type == "SEQ_2_SEQ_LM":  # the prefixes are the decoder's: its mask covers them
                kwargs["decoder_attention_mask"] = with_prompt_mask(kwargs.get("decoder_attention_mask"))
            else:
                attention_mask = with_prompt_mask(attention_mask)
            kwargs[cache_argument(model)] = self.get_prompt(batch)
            return model(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
            )
        attention_mask = with_prompt_mask(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = input_embeddings(model)(input_ids)
        if labels is not None and config.task_type == "CAUSAL_LM":
            labels = torch.cat([torch.full((batch, p), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        if kwargs.get("token_type_ids") is not None:  # SEQ_CLS keeps them: segment 0 for the virtual tokens
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, p), types], dim=1).long()
        # encoder-decoders: the table holds a block per submodule; PEFT feeds the encoder the first
        prompts = self.get_prompt(batch)[:, :p].to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @staticmethod
    def _adjust_kwargs(config, kwargs: dict) -> None:
        if kwargs.get("position_ids") is not None:
            if isinstance(config, PrefixTuningConfig):
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                warnings.warn("position_ids are ignored with virtual tokens prepended (as in PEFT)", stacklevel=3)
                kwargs["position_ids"] = None
        if kwargs.get("token_type_ids") is not None and config.task_type != "SEQ_CLS":
            warnings.warn("token_type_ids are ignored with prompt learning (as in PEFT)", stacklevel=3)
            kwargs["token_type_ids"] = None

    # ---- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """The base model's ``generate`` with the active adapter's virtual tokens in the first step
        only (the KV cache carries them afterwards). Returns what the base model's generate returns:
        the input ids followed by the new tokens."""
        model = self.model
        with self._base_runs_plain():
            if self._active() is None:
                return model.generate(*args, **kwargs)
            if self.active_peft_config.task_type != "CAUSAL_LM":
                task = self.active_peft_config.task_type
                raise ValueError(f"generate: supported for task_type 'CAUSAL_LM' adapters, this one is {task!r}")
            if _is_transformers_model(model):
                return self._generate_transformers(model, *args, **kwargs)
            return self._generate_builtin(model, *args, **kwargs)

    def _generate_builtin(
        self,
        model,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        config = self.active_peft_config
        b, p = input_ids.shape[0], config.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat(
            [torch.ones(b, p, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], dim=1
        )
        if isinstance(config, PrefixTuningConfig):
            return model.generate(input_ids, max_new_tokens, mask, past_key_values=self.get_prompt(b), **kwargs)
        embeds = model.get_input_embeddings()(input_ids)
        embeds = torch.cat([self.get_prompt(b).to(embeds.dtype), embeds], dim=1)
        return model.generate(input_ids, max_new_tokens, mask, inputs_embeds=embeds, **kwargs)

    def _generate_transformers(self, model, *args, **kwargs):
        had_own = "prepare_inputs_for_generation" in model.__dict__
        original = model.prepare_inputs_for_generation
        model.prepare_inputs_for_generation = functools.partial(self._prepare_inputs_for_generation, original)
        try:
            return model.generate(*args, **kwargs)
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def _prepare_inputs_for_generation(self, original, *args, **kwargs) -> dict:
        """PEFT's ``PeftModelForCausalLM.prepare_inputs_for_generation`` for prompt learning: the virtual
        tokens go in when the cache is empty (the first step), the mask always covers them."""
        import transformers

        config = self.active_peft_config
        p = config.num_virtual_tokens
        is_prefix = isinstance(config, PrefixTuningConfig)
        model_kwargs = original(*args, **kwargs)
        cache_position = model_kwargs.get("cache_position")
        is_prefill = cache_position is not None and int(cache_position[0]) == 0
        cache_key = cache_argument(self.model) or "past_key_values"
        for key in ("cache", "past_key_values"):
            if key != cache_key and model_kwargs.get(key) is not None:
                model_kwargs[cache_key] = model_kwargs.pop(key)
        if model_kwargs.get("use_cache") is False:
            # transformers 5 hands back the cache a forward returned even without use_cache; without
            # caching every step recomputes the whole sequence, virtual tokens included
            model_kwargs.pop(cache_key, None)
        cache = model_kwargs.get(cache_key)
        if cache is not None:
            seq_len = cache[0][0].shape[-2] if isinstance(cache, (tuple, list)) else cache.get_seq_length()
            if seq_len >= model_kwargs["input_ids"].shape[1]:
                model_kwargs["input_ids"] = model_kwargs["input_ids"][:, -1:]
        mask = model_kwargs.get("attention_mask")
        if isinstance(mask, dict):
            if len(mask) != 1:
                raise ValueError(f"attention_mask: expected a single mask, got {len(mask)}")
            mask = next(iter(mask.values()))
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"attention_mask: prompt learning generation takes a 2D mask, got {mask.dim()}D")
            ids = model_kwargs["input_ids"]
            ones = torch.ones(ids.shape[0], p, dtype=mask.dtype, device=mask.device)
            model_kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        self._adjust_kwargs(config, model_kwargs)
        cache = model_kwargs.get(cache_key)
        needs_prompt = cache is None or (isinstance(cache, transformers.Cache) and not cache.get_seq_length())
        if needs_prompt and is_prefix:
            model_kwargs[cache_key] = self.get_prompt(model_kwargs["input_ids"].shape[0])
        elif needs_prompt:
            ids = model_kwargs["input_ids"]
            embeds = input_embeddings(self.model)(ids)
            model_kwargs["inputs_embeds"] = torch.cat([self.get_prompt(ids.shape[0]).to(embeds.dtype), embeds], 1)
            model_kwargs["input_ids"] = None
        if is_prefill and is_prefix:
            model_kwargs["cache_position"] = model_kwargs["cache_position"] + p
        elif not is_prefix:
            model_kwargs.pop("cache_position", None)
        return model_kwargs


def _encoder_decoder_prefix(kv: torch.Tensor, layers: int):
    """PEFT's encoder-decoder prefixes from kv [B, P, 2·layers, H, D]: the 2·layers rows are laid out twice
    and cut into blocks of four per layer (self k, self v, cross k, cross v), then the cross-attention part
    is dropped (the encoder output fills it), so layer i's self-attention prefix is rows (4i, 4i+1) of
    that doubled layout."""
    from transformers import DynamicCache, EncoderDecoderCache

    doubled = torch.cat([kv, kv], dim=2).permute(2, 0, 3, 1, 4)
    self_attention = tuple((doubled[4 * i], doubled[4 * i + 1]) for i in range(layers))
    cache = EncoderDecoderCache(DynamicCache(self_attention), DynamicCache())
    cache.is_updated = {i: False for i in range(layers)}
    return cache


def _tokenize(config: PromptTuningConfig) -> list[int]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(
            "tokenizer_name_or_path: loading a tokenizer needs transformers; or give prompt_tuning_init_token_ids"
        ) from None
    tokenizer_kwargs = dict(config.tokenizer_kwargs or {})
    tokenizer_kwargs.pop("trust_remote_code", None)  # a config file must not run code
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **tokenizer_kwargs)
    return list(tokenizer(config.prompt_tuning_init_text)["input_ids"])


def route_base_calls(peft_model: nn.Module) -> nn.Module:
    """For training loops that hold the base model instead of the PEFT model (the command line): calls
    to the base model itself then go through ``peft_model`` — virtual tokens added, logits returned for
    the real positions only (so they line up with ``input_ids``) — and the base model carries the
    prompt encoders as ``prompt_encoder``, so ``.to()``, ``.parameters()`` and checkpoints see them."""
    tuner = peft_model.base_model
    base = tuner.model
    if "prompt_encoder" in base._modules:
        raise ValueError("model: its calls are already routed through a prompt-learning model")
    base.add_module("prompt_encoder", tuner.prompt_encoder)
    plain_forward = base.forward

    @functools.wraps(plain_forward)
    def forward(*args, **kwargs):
        if tuner.__dict__.get("_routing") or tuner._active() is None:
            return plain_forward(*args, **kwargs)
        out = peft_model(*args, **kwargs)
        config = peft_model.active_peft_config
        if not isinstance(config, PrefixTuningConfig):
            out.logits = out.logits[:, config.num_virtual_tokens :]
        return out

    base.forward = forward
    return peft_model
