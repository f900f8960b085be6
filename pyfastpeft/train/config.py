"""The settings of the training commands, as plain dataclasses.

The command line (:mod:`pyfastpeft.cli`) parses flags into these; a program builds them directly. Field
names are the flags' names with ``_`` for ``-``, and the defaults are the ones ``--help`` documents.
``None`` means "depends on the model" (the built-in model or a real one) and is filled in by
:func:`pyfastpeft.train.base.resolve_defaults` at the start of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# the target linears of a Llama-style decoder block
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    """``pyfastpeft finetune``: base model, data, training loop, PEFT method and the method's knobs."""

    method: str = "lora"
    model: str | None = None  # a Hugging Face folder, a .gguf file, "tiny"; None: SmolLM2-135M-Instruct
    quantized_base: bool = False  # a GGUF model's weights stay in the file's blocks (GGUFLinear)
    data: str | None = None  # a .jsonl or text file; None: the built-in task
    task: str | None = None  # None: dates (shift for the built-in model or a model without a tokenizer)
    held_out: int = 64
    size: str = "medium"  # the built-in model's size (base.SIZES)
    length: int = 8
    max_length: int = 128
    pretrain_task: str = "copy"
    pretrain_steps: int = 300
    device: str = "cpu"
    dtype: str = "float32"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    eval_every: int = 0
    log_every: int = 0
    out: str | None = None  # None: pyfastpeft_out/<method>
    resume: str | None = None  # "": <out>/checkpoint.safetensors
    stop_after: int | None = None
    fsdp: bool = False
    keep_freed_memory: bool = False  # glibc keeps freed memory for the next step (train.allocator)
    # method knobs (methods.METHOD_KNOBS lists them; a checkpoint and a saved adapter record them)
    target_modules: str = ",".join(LLAMA_TARGETS)  # comma-separated module-name suffixes
    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.05
    rslora: bool = False
    train_last_layers: int = 1
    freeze_first: int | None = None
    train_regex: str | None = None
    adapter_config: str = "pfeiffer"
    reduction_factor: int = 16
    num_virtual_tokens: int = 8
    encoder_hidden_size: int | None = None
    sparse_density: float = 0.02
    sparse_selection: str = "gradient"
    qat_bits: int = 4
    qat_group_size: int = 32
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    distill_teacher_steps: int | None = None
    # filled in by the run, not by the user: the Hugging Face folder of a real base (a .gguf --model is
    # converted into one), which the distillation teacher loads again
    base_folder: str | None = None

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """The defaults, then ``values`` (keys that are not fields are ignored: a record written by a newer
        or older version may carry some)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class CompareConfig:
    """``pyfastpeft compare``: every method on the same task, budget and seed."""

    methods: str = ""  # comma-separated; "": every registered method
    model: str = "tiny"  # tiny (at `sizes`), default (SmolLM2-135M-Instruct), a folder or a .gguf file
    sizes: str = "small,medium,large"
    task: str = "shift"  # the built-in model's task (a real model runs the dates task)
    steps: int | None = None  # None: 150 (tiny), 30 (a real model)
    pretrain_steps: int = 300
    batch_size: int | None = None  # None: 32 (tiny), 8 (a real model)
    lr: float | None = None  # None: each method's default, as finetune
    seed: int = 0
    keep_freed_memory: bool = False  # for every method's run, as finetune's (train.allocator)
    out: str = "pyfastpeft_out/compare"


@dataclass
class BenchConfig:
    """``pyfastpeft bench``: which ``bench/bench_<op>.py`` scripts run, where, and where the table goes."""

    op: str = "all"  # an op, a comma-separated list, or all
    device: str = "cpu"
    quick: bool = False
    out: str = "bench_out"
