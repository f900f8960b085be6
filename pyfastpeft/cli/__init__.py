"""The ``pyfastpeft`` command (also ``python -m pyfastpeft``): finetune, generate, bench, compare, report,
merge.

It only parses: flags (and ``--config`` files) become the dataclass configs of :mod:`pyfastpeft.train.config`
(:func:`to_config`), which the library functions in :mod:`pyfastpeft.train` run from. Every user error is
answered with one ``pyfastpeft: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import NoReturn, TypeVar

from ..errors import UserError
from ..models import TASKS
from ..train.config import BenchConfig, CompareConfig, FinetuneConfig
from ..train.methods import DESCRIPTIONS, METHODS
from .flags import add_training_arguments, device, int_at_least, positive_float, seed

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one line every other user error gets (subcommand parsers inherit this)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pyfastpeft: error: {message} (see {self.prog} --help)\n")


def to_config(cls: type[T], args: argparse.Namespace) -> T:
    """The parsed flags as the command's settings: each flag's ``dest`` is a field of ``cls`` (a field no
    flag sets keeps its default)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..train.finetune import run_finetune

    return run_finetune(to_config(FinetuneConfig, args))["exit_code"]


def cmd_generate(args: argparse.Namespace) -> int:
    from ..train.generate import GenerateSettings, run_generate

    prompts = list(args.prompts)
    if not prompts and not sys.stdin.isatty():
        prompts = [line.strip() for line in sys.stdin if line.strip()]
    if args.no_adapter and args.adapter is not None:
        raise UserError("--no-adapter: give either an adapter folder or --no-adapter, not both")
    if not args.no_adapter and args.adapter is None:
        raise UserError("--adapter: which adapter folder? (or --no-adapter for the base model alone)")
    settings = GenerateSettings(
        prompts=prompts,
        adapter=None if args.no_adapter else Path(args.adapter),
        base=args.base,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    run_generate(settings, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..train.bench_runner import run_benchmarks

    return run_benchmarks(to_config(BenchConfig, args))


def cmd_compare(args: argparse.Namespace) -> int:
    from ..train.compare import run_compare

    return run_compare(to_config(CompareConfig, args))


def cmd_report(args: argparse.Namespace) -> int:
    from ..train.adapter_report import run_report

    return run_report(args.adapter, args.base, as_json=args.json)


def cmd_merge(args: argparse.Namespace) -> int:
    from ..train.merge import run_merge

    return run_merge(args.base, args.adapter, args.out)


def cmd_export(args: argparse.Namespace) -> int:
    from ..train.gguf_export import default_embedding_quant, export_gguf

    embedding = args.embedding_quant or default_embedding_quant(args.quant)
    export_gguf(args.adapter, args.gguf, args.quant, args.model, embedding_quant=embedding)
    return 0


def add_keep_freed_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for the next step instead of returning it to the kernel: fewer page "
        "faults (faster where they are expensive, as in virtual machines), a higher peak (docs/cli.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyfastpeft", description="Fast parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = "\n".join(f"  {k:8s} {v}" for k, v in sorted(DESCRIPTIONS.items()))
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a model with a PEFT method (default: LoRA on the built-in model)",
        epilog="methods:\n" + methods,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(ft)
    ft.add_argument("--out", default=None, help="output folder (default: pyfastpeft_out/<method>)")
    ft.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a checkpoint (default: <out>/checkpoint.safetensors)",
    )
    ft.add_argument(
        "--stop-after",
        type=int_at_least(1),
        default=None,
        help="stop after this step as Ctrl-C would: save a checkpoint and exit",
    )
    ft.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (fully_shard) instead of DDP")
    add_keep_freed_memory(ft)
    ft.set_defaults(func=cmd_finetune)

    gen = sub.add_parser("generate", help="answer prompts with a base model plus a saved adapter (streamed)")
    gen.add_argument("prompts", nargs="*", help="prompts (default: one per line on stdin)")
    gen.add_argument("--adapter", default=None, help="adapter folder written by finetune (e.g. pyfastpeft_out/lora)")
    gen.add_argument("--no-adapter", action="store_true", help="the base model alone, for comparison")
    gen.add_argument(
        "--base",
        default=None,
        help="a Hugging Face folder or .gguf file (default: the base the adapter records, else SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--system", default=None, help="system turn (default: the task's instruction, or the template's)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="run the kernel benchmarks and collect one table")
    bench.add_argument(
        "--op",
        default="all",
        help="lora|multi_lora|quant|sparse|optim|bias|distill|all, or a comma-separated list (default: all that exist)",
    )
    bench.add_argument("--device", type=device, default="cpu")
    bench.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    bench.add_argument("--out", default="bench_out", help="folder for the table, JSON and chart (default: %(default)s)")
    bench.set_defaults(func=cmd_bench)

    cmp = sub.add_parser("compare", help="every method on the same task (built-in model sizes, or a real model)")
    cmp.add_argument("--methods", default=",".join(sorted(METHODS)), help="comma-separated (default: %(default)s)")
    cmp.add_argument(
        "--model",
        default="tiny",
        help="tiny (the built-in model at --sizes), default (SmolLM2-135M-Instruct on the dates task), a Hugging "
        "Face folder or a .gguf file (default: %(default)s)",
    )
    cmp.add_argument("--sizes", default="small,medium,large", help="comma-separated (default: %(default)s)")
    cmp.add_argument("--task", choices=TASKS, default="shift", help="the built-in model's task")
    cmp.add_argument("--steps", type=int_at_least(1), default=None, help="default: 150 (tiny), 30 (a real model)")
    cmp.add_argument("--pretrain-steps", type=int_at_least(0), default=300)
    cmp.add_argument("--batch-size", type=int_at_least(1), default=None, help="default: 32 (tiny), 8 (a real model)")
    cmp.add_argument(
        "--lr", type=positive_float, default=None, help="learning rate (default: each method's, as finetune)"
    )
    cmp.add_argument("--seed", type=seed, default=0)
    add_keep_freed_memory(cmp)
    cmp.add_argument("--out", default="pyfastpeft_out/compare")
    cmp.set_defaults(func=cmd_compare)

    rep = sub.add_parser("report", help="the parameter report of a saved adapter")
    rep.add_argument("adapter", help="adapter folder (written by finetune or save_pretrained)")
    rep.add_argument(
        "--base",
        default=None,
        help="the base model: a Hugging Face folder or 'builtin' (default: the built-in model when the "
        "adapter was trained on it, else none: no totals)",
    )
    rep.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    rep.set_defaults(func=cmd_report)

    mrg = sub.add_parser("merge", help="fold an adapter into its base model's weights (safetensors)")
    mrg.add_argument("base", help="a local Hugging Face model folder, or 'builtin' (the cached built-in model)")
    mrg.add_argument("adapter", help="adapter folder")
    mrg.add_argument("out", help="new folder for the merged model")
    mrg.set_defaults(func=cmd_merge)

    exp = sub.add_parser("export", help="merge an adapter into its llama base and write a GGUF file")
    exp.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    exp.add_argument("--quant", required=True, choices=["f16", "q8_0", "q4_0", "q4_1"], help="weight format")
    exp.add_argument("--adapter", required=True, metavar="DIR", help="a saved adapter folder")
    exp.add_argument(
        "--model",
        default=None,
        metavar="BASE",
        help="the base: a .gguf file or a folder converted from one (default: the base the adapter recorded)",
    )
    exp.add_argument(
        "--embedding-quant",
        default=None,
        choices=["f16", "q8_0", "q4_0", "q4_1"],
        help="format of the token embedding (default: q8_0 for the 4-bit formats, else --quant)",
    )
    exp.set_defaults(func=cmd_export)
    return parser


def _config_values(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: no such file: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--config {p}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UserError("--config: TOML needs Python 3.11+; use a .json file") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"--config {p}: not valid TOML ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {p}: expected a table of flag names to values")
    return values


def _config_value(path: str, key: str, action: argparse.Action, value: object) -> object:
    """``value`` from the config file as the flag would have given it, or a UserError naming the key."""
    where = f"--config {path}: {key}"
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None and action.default is None:
        return None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        value = ",".join(map(str, value))
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: expected a string or a number, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UserError(f"{where}: {err}") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} = {value!r} is not one of {list(action.choices)}")
    return value


def _apply_config(sub: argparse.ArgumentParser, path: str) -> None:
    """Config values become the subcommand's defaults, so flags on the command line still win."""
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in _config_values(path).items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in actions:
            raise UserError(
                f"--config {path}: unknown key {key!r}; known keys: "
                f"{', '.join(sorted(k.replace('_', '-') for k in actions))}"
            )
        defaults[dest] = _config_value(path, key, actions[dest], value)
    sub.set_defaults(**defaults)


def _check_out_folder(flag: str, out: str) -> None:
    """Refuse an output folder that cannot be created, before any work is done."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {out}: exists and is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {out}: {parent} is a file, not a folder")
            break


def _fail(message: str) -> int:
    print(f"pyfastpeft: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "config", None):
            sub = parser._subparsers._group_actions[0].choices[args.command]
            _apply_config(sub, args.config)
            args = parser.parse_args(argv)
        if args.command == "finetune" and args.out is None:
            args.out = str(Path("pyfastpeft_out") / args.method)
        if args.command in ("finetune", "bench", "compare"):
            _check_out_folder("--out", args.out)
        elif args.command == "merge":
            _check_out_folder("out", args.out)
        return args.func(args)
    except UserError as err:  # DataError included; any other exception is a bug and keeps its traceback
        return _fail(str(err))
    except OSError as err:
        if err.filename is None:  # not about a path the user named
            raise
        return _fail(f"{err.filename}: {err.strerror or err}")
