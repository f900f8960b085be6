"""The package's import graph, read from the source with ``ast`` (nothing is imported): imports flow one
way, cli → train → tuners → nn → ops, and no module imports itself back through a chain of others.

Every ``import`` and ``from ... import`` counts, relative or absolute, at module level or inside a
function (a lazy import is still a dependency; it only hides a cycle until the wrong call order).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyfastpeft"
ROOT = "pyfastpeft"  # the package's own __init__: the public facade
# built artefacts imported by name that are not Python source (the compiled ops, the generated build info)
BUILT = {"pyfastpeft._C", "pyfastpeft._build_info"}

# Each part of the package (its top-level subpackage or module) with its layer: a part may import only
# parts on a lower layer. The main line is cli (7) → train (6) → tuners (5) → nn (2) → ops (1).
LAYER = {
    "__main__": 8,  # python -m pyfastpeft
    "cli": 7,  # parses flags into train's dataclass configs and calls train
    "train": 6,  # the commands' library: fine-tuning runs, comparison, saved adapters, merge
    ROOT: 6,  # `import pyfastpeft`: re-exports the library, never train or cli
    "tuners": 5,  # PEFT methods: configs, layers, injection, the PeftModel frame, effective weights
    "report": 4,  # parameter accounting of any PeftModel, through its hooks (naming no method)
    "io": 3,  # adapter files: safetensors + adapter_config.json
    "quant": 3,  # quantization-aware training over nn's fake-quantized linear
    "heads": 2,  # task heads over a base model (plain torch)
    "nn": 2,  # modules over the ops
    "optim": 2,  # optimizers over the ops
    "distill": 2,  # distillation losses over the ops
    "lm_loss": 2,  # a causal LM's loss with its head fused in, over the ops
    "models": 1,  # the built-in TinyLlama, its tasks, and the real model's loader
    "ops": 1,  # thin wrappers of the compiled ops
    "_extension": 0,  # loads the compiled ops
    "errors": 0,  # UserError
}

# Which part imports which, as the code does it: an import between parts that is not listed here fails,
# so a new dependency is a decision made in this table (and it must go down the layers).
ALLOWED = {
    "__main__": {"cli"},
    "cli": {"train", "models", "errors"},
    "train": {"report", "tuners", "io", "quant", "nn", "optim", "distill", "lm_loss", "models", "ops", "errors"},
    ROOT: {
        "report",
        "tuners",
        "io",
        "quant",
        "heads",
        "nn",
        "optim",
        "distill",
        "lm_loss",
        "models",
        "ops",
        "_extension",
    },
    "report": {"io"},
    "tuners": {"report", "io", "nn", "ops", "errors"},
    "io": {"errors"},
    "quant": {"nn"},
    "heads": set(),
    "nn": {"ops"},
    "optim": {"ops"},
    "distill": {"ops"},
    "lm_loss": {"ops"},
    "models": {"errors"},
    "ops": {"_extension"},
    "_extension": set(),
    "errors": set(),
}
# Upward imports the code still has: the tuners ↔ io ↔ report cycle (tuners/base.py imports io, whose
# adapter_files.py imports tuners/base.py; tuners imports report, which imports tuners).


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if ".".join(parts) not in BUILT:  # a build writes _build_info.py into the source tree
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str:
    """The module ``name`` lives in: itself, or the nearest package above it (``pkg.attr`` → ``pkg``)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {_known(a.name, modules) for a in node.names if a.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != ROOT:
                continue
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                full = f"{target}.{alias.name}"
                if full not in BUILT:
                    found.add(full if full in modules else _known(target, modules))
    found.discard(name)
    return found


def module_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ROOT


def part_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) → the module imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, targets in graph.items():
        for target in sorted(targets):
            if part(module) != part(target):
                edges.setdefault((part(module), part(target)), []).append(f"{module} -> {target}")
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return module_graph()


def test_the_graph_sees_the_package(graph):
    # a reader that found nothing would pass every test below
    assert {"pyfastpeft.cli", "pyfastpeft.train.finetune", "pyfastpeft.tuners", "pyfastpeft.ops"} <= set(graph)
    assert "pyfastpeft.train.config" in graph["pyfastpeft.train.finetune"]
    assert "pyfastpeft.train.finetune" in graph["pyfastpeft.cli"]  # an import inside a function counts
    assert set(LAYER) == set(ALLOWED) == {part(m) for m in graph}


def test_the_table_goes_down_the_layers():
    upward = [(a, b) for a, targets in ALLOWED.items() for b in targets if LAYER[a] <= LAYER[b]]
    assert not upward
    assert LAYER["cli"] > LAYER["train"] > LAYER["tuners"] > LAYER["nn"] > LAYER["ops"]


def test_parts_import_only_what_the_table_allows(graph):
    edges = part_edges(graph)
    unlisted = {edge: where[:3] for edge, where in edges.items() if edge[1] not in ALLOWED[edge[0]]}
    assert not unlisted, f"imports the layer table does not allow: {unlisted}"


def test_the_library_does_not_depend_on_the_command_line(graph):
    for module, path in _modules().items():
        if part(module) == "train":
            assert "pyfastpeft.cli" not in graph[module]
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            assert "argparse" not in names, f"{module} imports argparse: library code takes dataclass configs"


def test_no_import_cycle(graph):
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_no_upward_import(graph):
    upward = {edge for edge in part_edges(graph) if LAYER[edge[1]] >= LAYER[edge[0]]}
    assert not upward, f"imports that do not go down a layer: {upward}"
