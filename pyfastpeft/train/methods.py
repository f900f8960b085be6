"""The PEFT methods the command line can apply, by name.

Each method is ``apply(model, args) -> model``: it decides which tensors train (freezing the rest) and
may replace modules. ``args`` is the run's :class:`~pyfastpeft.train.config.FinetuneConfig`, so a method
reads its own knobs from it (``args.r``, ``args.alpha``, ``args.target_modules``, ``args.train_last_layers``,
...). A new method registers itself with :func:`register`; its knobs are fields of ``FinetuneConfig``
(listed in ``METHOD_KNOBS``) and flags of the command line (:mod:`pyfastpeft.cli.flags`). A method's
command-line name is declared once, with its peft_type, in :mod:`pyfastpeft.tuners.registry`.

``apply`` must be deterministic given the seed and the knobs: ``--resume``, ``pyfastpeft report`` and
``pyfastpeft merge`` rebuild the adapted model by calling it again and then load the saved tensors.

A method that changes the training loop itself (its loss, its optimizer, or a data-dependent set-up
such as gradient-based selection) registers ``parts(model, args, source, device, log) -> TrainingParts``
with :func:`register_training_parts`; it runs after ``apply`` and the move to the device, and only
when training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..lm_loss import fused_head
from ..tuners import LoraConfig, get_peft_model, registry
from .config import FinetuneConfig

# the method knobs of FinetuneConfig; a checkpoint records them so --resume can check them
METHOD_KNOBS = ["target_modules", "r", "alpha", "dropout", "rslora", "train_last_layers", "freeze_first", "train_regex"]
METHOD_KNOBS += ["adapter_config", "reduction_factor"]
METHOD_KNOBS += ["num_virtual_tokens", "encoder_hidden_size"]  # prompt, ptuning, prefix

MethodFn = Callable[[nn.Module, FinetuneConfig], nn.Module]
# read-only views of the one method registry (pyfastpeft.tuners.registry): name -> apply, name -> text
METHODS = registry.cli_methods
DESCRIPTIONS = registry.cli_descriptions


@dataclass
class TrainingParts:
    """What a method changes in the training loop beyond which tensors train (None: the default).

    ``summed_loss(model, logits, batch)``: the loss summed over the batch's predicted tokens (labels
    != -100, shifted by one as in causal LM), in place of the cross-entropy sum.
    ``summed_loss_from_hidden(hidden, head_weight, targets, keep, inputs)``: the same sum from the
    student's last hidden states at the predicted positions only (``hidden[:, :-1][keep]``, their
    ``targets``), for a loop that fuses the head into the loss (``pf.lm_loss.fused_head``); ``inputs``
    are the model's inputs, for a teacher's own forward.
    ``optimizer(params, lr, weight_decay)``: in place of ``torch.optim.AdamW``; its ``state_dict`` must
    round-trip through the checkpoint like AdamW's."""

    summed_loss: Callable | None = None
    summed_loss_from_hidden: Callable | None = None
    optimizer: Callable | None = None


PartsFn = Callable[..., TrainingParts]
TRAINING_PARTS: dict[str, PartsFn] = {}


def register_training_parts(name: str) -> Callable[[PartsFn], PartsFn]:
    def wrap(fn: PartsFn) -> PartsFn:
        TRAINING_PARTS[name] = fn
        return fn

    return wrap


def training_parts(name: str, model: nn.Module, args: FinetuneConfig, source, device, log=print) -> TrainingParts:
    fn = TRAINING_PARTS.get(name)
    return fn(model, args, source, device, log) if fn is not None else TrainingParts()


def register(name: str, description: str) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        registry.register_cli_method(name, description, fn)
        return fn

    return wrap


def apply_method(name: str, model: nn.Module, args: FinetuneConfig) -> nn.Module:
    if name not in METHODS:
        raise UserError(f"--method: unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](model, args)
    except UserError:
        raise
    except ValueError as err:
        # the tuners refuse a config that the flags built (targets matching nothing, a bad rank, ...):
        # the flags are the user's input, so it is answered as one
        raise UserError(f"--method {name}: {err}") from err


def _targets(args: FinetuneConfig) -> list[str]:
    return [t.strip() for t in str(args.target_modules).split(",") if t.strip()]


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@register("lora", "low-rank update B·A on the target linears (fused pyfastpeft op)")
def apply_lora(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    """Adapts ``model`` in place through :func:`pyfastpeft.get_peft_model` and returns the PeftModel
    (which saves the adapter in Hugging Face PEFT's layout)."""
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        target_modules=_targets(args),
    )
    return get_peft_model(model, config)


@register("full", "every parameter trains (the baseline PEFT is measured against)")
def apply_full(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest ``nn.ModuleList`` (``model.layers`` in Llama)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError(f"{type(model).__name__} has no nn.ModuleList of blocks to freeze or train")
    return max(lists, key=lambda nm: len(nm[1]))


# ---- BitFit and layer freezing, through their PEFT configs ------------------------------------------
@register("bitfit", "biases only (BitFitConfig); target linears without a bias get a zero-initialised one")
def apply_bitfit(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    """The target linears become BiasOnlyLinear (the bias-gradient op saves no input activation); layer
    norm biases train too (Llama's RMSNorm has none). Returns the BitFitModel."""
    from ..tuners import BitFitConfig

    try:
        return get_peft_model(model, BitFitConfig(target_modules=_targets(args)))
    except ValueError as err:
        raise UserError(f"--target-modules: {err}") from None


@register("freeze", "layer freezing (LayerFreezeConfig): --train-last-layers, --freeze-first or --train-regex")
def apply_freeze(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    from ..tuners import LayerFreezeConfig

    path, blocks = decoder_blocks(model)
    n = len(blocks)
    if args.freeze_first is not None:
        if not 0 <= args.freeze_first < n:
            raise UserError(f"--freeze-first: expected 0..{n - 1} (blocks in {path}), got {args.freeze_first}")
        selection = {"layer_range": [args.freeze_first, None]}
    elif args.train_regex is None:
        if not 1 <= args.train_last_layers <= n:
            raise UserError(f"--train-last-layers: expected 1..{n} (blocks in {path}), got {args.train_last_layers}")
        selection = {"last_layers": args.train_last_layers}
    else:
        selection = {}
    if args.train_regex is not None:
        selection["trainable_regex"] = args.train_regex
    try:
        config = LayerFreezeConfig(layers_pattern=path, **selection)
        return get_peft_model(model, config)
    except ValueError as err:
        flag = "--train-regex" if "trainable_regex" in str(err) else "--method freeze"
        raise UserError(f"{flag}: {err}") from None


# ---- (IA)³ and bottleneck adapters --------------------------------------------------------------------
@register("ia3", "(IA)³: learned scales of keys, values and the feed-forward input (PEFT's IA3 defaults)")
def apply_ia3(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    from ..tuners import IA3Config

    return get_peft_model(model, IA3Config())


@register("adapter", "bottleneck adapters (--adapter-config houlsby|pfeiffer|parallel, --reduction-factor)")
def apply_adapter(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    from ..tuners import AdapterConfig

    return get_peft_model(model, AdapterConfig(config=args.adapter_config, reduction_factor=args.reduction_factor))


# ---- dora, sparse, qat-lora, distill ---------------------------------------------------------------
METHOD_KNOBS.extend(
    [
        "sparse_density",
        "sparse_selection",
        "qat_bits",
        "qat_group_size",
        "distill_alpha",
        "distill_temperature",
        "distill_teacher_steps",
    ]
)


def _lora_config(args: FinetuneConfig, **extra) -> LoraConfig:
    return LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        target_modules=_targets(args),
        **extra,
    )


@register("dora", "LoRA with a trained magnitude per output row (weight-decomposed LoRA, use_dora)")
def apply_dora(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    return get_peft_model(model, _lora_config(args, use_dora=True))


@register("sparse", "a sparse delta on the target linears: --sparse-density of the entries train (SparseAdamW)")
def apply_sparse(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    # Entries are chosen here by magnitude (or at random); for gradient/fisher selection the training
    # parts below re-select them from scores on the training data before the first step.
    from ..tuners import SparseConfig

    if not 0.0 < args.sparse_density <= 1.0:
        raise UserError(f"--sparse-density: expected a fraction in (0, 1], got {args.sparse_density}")
    strategy = "random" if args.sparse_selection == "random" else "magnitude"
    config = SparseConfig(
        target_modules=_targets(args), density=args.sparse_density, selection=strategy, seed=args.seed
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"--target-modules: {err}") from None


@register_training_parts("sparse")
def sparse_parts(model: nn.Module, args: FinetuneConfig, source, device, log) -> TrainingParts:
    from ..nn import SparseDeltaLinear
    from ..nn.sparse_delta_linear import gradient_scores, select_indices
    from ..optim import SparseAdamW
    from .data import batch_to

    if args.sparse_selection in ("gradient", "fisher"):
        # Dense weight gradients need plain linears: while delta is still zero, each SparseDeltaLinear is
        # swapped for an nn.Linear sharing its weight and bias (the same function), scored, swapped back.
        swaps = []
        for name, layer in list(model.named_modules()):
            if isinstance(layer, SparseDeltaLinear):
                linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
                linear.weight, linear.bias = layer.weight, layer.bias
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, child, linear)
                swaps.append((owner, child, layer, linear))
        gen = torch.Generator().manual_seed(args.seed + 2)  # its own stream: the training data stays the same
        batches = [batch_to(source.batch(args.batch_size, gen), device) for _ in range(4)]

        def loss_fn(batch):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch.labels[:, 1:].reshape(-1), ignore_index=-100
            )

        try:
            scores = gradient_scores([s[3] for s in swaps], loss_fn, batches, kind=args.sparse_selection)
        finally:
            for owner, child, layer, _ in swaps:
                setattr(owner, child, layer)
        with torch.no_grad():
            for (_, _, layer, _), score in zip(swaps, scores, strict=True):
                layer.indices = select_indices(layer.weight, layer.delta.numel(), args.sparse_selection, score)
        log(f"sparse: {args.sparse_selection} selection from 4 batches of the training data")
    return TrainingParts(optimizer=lambda params, lr, wd: SparseAdamW(params, lr=lr, weight_decay=wd))


@register("qat-lora", "LoRA over a fake-quantized base (weight-only, --qat-bits, --qat-group-size)")
def apply_qat_lora(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    # Weight-only fake quantization keeps the merged model exact: y = fq(W)·x + s·B·A·x folds into one
    # float matrix fq(W) + s·B·A, which `pyfastpeft merge` writes.
    from ..quant import QATConfig, prepare_qat

    if not 2 <= args.qat_bits <= 8:
        raise UserError(f"--qat-bits: expected 2..8, got {args.qat_bits}")
    config = QATConfig.weight_only(bits=args.qat_bits, group_size=args.qat_group_size, target_modules=_targets(args))
    try:
        prepare_qat(model, config)
    except ValueError as err:
        raise UserError(f"qat-lora (--target-modules, --qat-group-size): {err}") from None
    return get_peft_model(model, _lora_config(args))


@register("distill", "LoRA trained to match a fully fine-tuned teacher (--distill-alpha, --distill-temperature)")
def apply_distill(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    if not 0.0 <= args.distill_alpha <= 1.0:
        raise UserError(f"--distill-alpha: expected a weight in [0, 1], got {args.distill_alpha}")
    if not args.distill_temperature > 0:
        raise UserError(f"--distill-temperature: expected a positive number, got {args.distill_temperature}")
    return get_peft_model(model, _lora_config(args))


@register_training_parts("distill")
def distill_parts(model: nn.Module, args: FinetuneConfig, source, device, log) -> TrainingParts:
    from ..distill import DistillationLoss
    from .teacher import fine_tuned_teacher

    teacher = fine_tuned_teacher(args, source, device, next(model.parameters()).dtype, log)
    loss = DistillationLoss(temperature=args.distill_temperature, alpha=args.distill_alpha)
    summed_loss, from_hidden = kd_summed_losses(teacher, loss)
    return TrainingParts(summed_loss=summed_loss, summed_loss_from_hidden=from_hidden)


def kd_summed_losses(teacher: nn.Module, loss) -> tuple[Callable, Callable | None]:
    """``(summed_loss, summed_loss_from_hidden)`` of a distillation ``loss`` (a ``DistillationLoss``)
    against ``teacher`` (see :class:`TrainingParts`); the second is None when the teacher's head cannot
    be fused (``pf.lm_loss.fused_head``)."""

    def summed_loss(student: nn.Module, logits: torch.Tensor, batch) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        vocab = logits.shape[-1]
        labels = batch.labels[:, 1:].reshape(-1)
        mean = loss(
            logits[:, :-1].reshape(-1, vocab).float(), teacher_logits[:, :-1].reshape(-1, vocab).float(), labels
        )
        return mean * (labels != -100).sum()

    teacher_head = fused_head(teacher)
    if teacher_head is None:
        return summed_loss, None
    teacher_backbone, teacher_lm_head = teacher_head

    def summed_loss_from_hidden(hidden, head_weight, targets, keep, inputs) -> torch.Tensor:
        # the teacher's hidden states at the same positions; the KD terms of the other positions are 0
        with torch.no_grad():
            teacher_hidden = teacher_backbone(**inputs)[0][:, :-1][keep]
        mean = loss.from_hidden(hidden, head_weight, teacher_hidden, teacher_lm_head.weight, targets)
        return mean * targets.numel()

    return summed_loss, summed_loss_from_hidden


# ---- prompt learning: prompt tuning, P-tuning, prefix tuning -------------------------------------
def _prompt_learning(model: nn.Module, config) -> nn.Module:
    from ..tuners.prompt_learning import route_base_calls

    # the training loop calls the base model: route those calls through the virtual tokens
    return route_base_calls(get_peft_model(model, config))


@register("prompt", "prompt tuning: --num-virtual-tokens learned input embeddings prepended to the input")
def apply_prompt(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    from ..tuners import PromptTuningConfig

    return _prompt_learning(model, PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens))


@register("ptuning", "P-tuning: virtual tokens produced by an MLP prompt encoder (--encoder-hidden-size)")
def apply_ptuning(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    from ..tuners import PromptEncoderConfig

    config = PromptEncoderConfig(
        num_virtual_tokens=args.num_virtual_tokens, encoder_hidden_size=args.encoder_hidden_size
    )
    return _prompt_learning(model, config)


@register(
    "prefix", "prefix tuning: learned per-layer key/value prefixes (MLP-reparameterised with --encoder-hidden-size)"
)
def apply_prefix(model: nn.Module, args: FinetuneConfig) -> nn.Module:
    from ..tuners import PrefixTuningConfig

    config = PrefixTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        encoder_hidden_size=args.encoder_hidden_size,
        prefix_projection=args.encoder_hidden_size is not None,
    )
    return _prompt_learning(model, config)
