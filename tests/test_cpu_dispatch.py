"""Runtime CPU dispatch: the level in use, forcing one, refusing what the machine cannot run, that only
each level's own code uses its instructions, and that every level the machine runs computes the same
results (Philox masks bit for bit, the rest within the dtype's rounding), deterministically."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pyfastpeft
from pyfastpeft.ops import reference
from tests import cpu_levels_probe as probe

INFO = pyfastpeft.build_info()
BUILT = INFO["cpu_capabilities_built"]
RUNNABLE = INFO["cpu_capabilities_runnable"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_python(code: str, level: str | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYFASTPEFT_CPU_CAPABILITY", None)
    if level is not None:
        env["PYFASTPEFT_CPU_CAPABILITY"] = level
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def test_build_info_names_the_levels():
    assert BUILT == (["default", "avx2", "avx512"] if X86 else ["default"])
    assert RUNNABLE[0] == "default" and set(RUNNABLE) <= set(BUILT)
    assert RUNNABLE == BUILT[: len(RUNNABLE)]  # a CPU that runs a level runs the ones below it
    forced = os.environ.get("PYFASTPEFT_CPU_CAPABILITY")
    assert INFO["cpu_capability"] == (forced or RUNNABLE[-1])


@pytest.mark.parametrize("level", ["default", "avx2", "avx512"])
def test_forcing_a_level(level):
    code = "import pyfastpeft; print('LEVEL', pyfastpeft.build_info()['cpu_capability'])"
    out = run_python(code, level)
    if level in RUNNABLE:
        assert out.returncode == 0, out.stderr
        assert f"LEVEL {level}" in out.stdout
    else:  # refused at import with the reason, never a silent fallback
        assert out.returncode != 0
        assert f"PYFASTPEFT_CPU_CAPABILITY={level}" in out.stderr
        reason = "this CPU cannot run that level" if level in BUILT else "this build has no kernels for that level"
        assert reason in out.stderr, out.stderr


@pytest.mark.parametrize("value", ["avx3", "AVX-2", "native"])
def test_unknown_level_is_refused(value):
    out = run_python("import pyfastpeft", value)
    assert out.returncode != 0
    assert f"PYFASTPEFT_CPU_CAPABILITY={value}: expected one of default, avx2, avx512" in out.stderr, out.stderr


def test_empty_setting_means_detect():
    out = run_python("import pyfastpeft; print('LEVEL', pyfastpeft.build_info()['cpu_capability'])", "")
    assert out.returncode == 0 and f"LEVEL {RUNNABLE[-1]}" in out.stdout, out.stderr


# ---- the instructions in the built library ----------------------------------------------------------
_FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")
# a call through the PLT (``<f@plt>``) is a call to f: with default visibility, calls to inline functions
# and template instances (the ones a level's object and the baseline both emit) go through it
_CALL = re.compile(r"\s(?:call|jmp)\s+[0-9a-f]+ <(.*?)(?:@plt)?(?:\+0x[0-9a-f]+)?>$")
_AVX = re.compile(r"%[yz]mm\d|^\s*[0-9a-f]+:\s+v[a-z0-9]+\s.*%xmm")
# AVX-512 (EVEX) code: 512-bit registers, the upper sixteen vector registers, or the mask registers
_AVX512 = re.compile(r"%zmm\d|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%k[0-7]\b")
_LEVEL_NAME = re.compile(r"\b(?:pyfastpeft|at::vec)::(?:\w+::)*?(AVX2|AVX512)::")


def _disassembly() -> dict[str, list[str]]:
    lib = Path(pyfastpeft._extension._C.__file__)
    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    funcs: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            lines = funcs.setdefault(m.group(1), [])
        else:
            lines.append(line)
    return funcs


@pytest.fixture(scope="module")
def disassembly():
    if not X86 or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    return _disassembly()


_MANGLED_LEVEL = re.compile(r"(?<![0-9])(?:4(AVX2)|6(AVX512))(?![0-9A-Za-z_])")


def _level_of(name: str) -> str | None:
    """The highest level named in a function's name (a template argument or a lambda's scope counts).
    OpenMP outlined bodies (``…._omp_fn.0``) stay mangled in objdump's output: their level is read from
    the mangled namespace (``4AVX2``, ``6AVX512``)."""
    levels = {m.group(1) for m in _LEVEL_NAME.finditer(name)}
    levels |= {a or b for a, b in _MANGLED_LEVEL.findall(name)}
    return "AVX512" if "AVX512" in levels else "AVX2" if levels else None


def _base(symbol: str) -> str:
    return re.sub(r"\.(?:cold|part\.\d+|isra\.\d+|constprop\.\d+)(?:\.\d+)?$", "", symbol)


def avx_called_from_baseline(funcs: dict[str, list[str]]) -> list[str]:
    """The one-definition-rule hazard (CMakeLists.txt): an inline function that a level's object and the
    baseline both emit must keep the baseline copy, or baseline code would run AVX. Any AVX code outside
    a level's namespace must be called only from that level's code. Returns the violations."""
    avx = {name for name, body in funcs.items() if any(_AVX.search(line) for line in body)}
    callers: dict[str, set[str]] = {}
    for name, body in funcs.items():
        for line in body:
            m = _CALL.search(line)
            if m:
                callers.setdefault(m.group(1), set()).add(name)
    problems = []
    for name in sorted(n for n in avx if _level_of(n) is None):
        if name.startswith("_GLOBAL__sub_I"):
            problems.append(f"a load-time initialiser runs AVX code: {name}")
        # only other AVX code calls it (baseline code is never compiled with AVX, so its callers would show)
        # a function's split-off parts (``.cold``, ``.part.N``) are the function itself
        baseline_callers = {
            c for c in callers.get(name, ()) if c not in avx and _level_of(c) is None and _base(c) != _base(name)
        }
        if baseline_callers:
            problems.append(f"{name} (AVX code) is called from baseline code: {sorted(baseline_callers)[:3]}")
    return problems


def _philox_multiply(line: str, register: str) -> bool:
    return "vpmuludq" in line and register in line


def level_instruction_problems(funcs: dict[str, list[str]]) -> list[str]:
    """Each level's kernels are there with their own instructions, and none of a higher level's: the
    AVX-512 Philox kernel and masked product use 512-bit registers, the AVX2 Philox kernel 256-bit ones,
    no AVX2 code any AVX-512 instruction, and no baseline kernel any AVX instruction at all."""
    by_level: dict[str, list[str]] = {"AVX2": [], "AVX512": []}
    for name in funcs:
        level = _level_of(name)
        if level:
            by_level[level].append(name)
    problems = []
    wide = [n for n in by_level["AVX512"] if any(_AVX512.search(line) for line in funcs[n])]
    # the Philox rounds are the only 32x32->64-bit multiplies (vpmuludq) in the kernels; looked for by
    # instruction, since the compiler may inline the round function into every caller
    if not any(_philox_multiply(line, "%zmm") for n in by_level["AVX512"] for line in funcs[n]):
        problems.append("the AVX-512 Philox kernel is missing")
    if not any("dropout_mul_range<float, float>" in n for n in wide):
        problems.append("the AVX-512 masked dropout product is missing")
    if not any(_philox_multiply(line, "%ymm") for n in by_level["AVX2"] for line in funcs[n]):
        problems.append("the AVX2 Philox kernel is missing")
    problems += [f"AVX2 code uses AVX-512: {n}" for n in by_level["AVX2"] if any(_AVX512.search(x) for x in funcs[n])]
    default = [n for n in funcs if "pyfastpeft::DEFAULT::" in n]
    if not default:
        problems.append("no baseline kernels")
    problems += [f"baseline code uses AVX: {n}" for n in default if any(_AVX.search(x) for x in funcs[n])]
    return problems


def test_only_per_level_code_uses_avx(disassembly):
    assert not avx_called_from_baseline(disassembly)


def test_every_level_is_in_the_library(disassembly):
    assert not level_instruction_problems(disassembly)


def test_the_instruction_checks_catch_what_they_look_for(disassembly):
    """The two checks above on doctored copies of the library's own disassembly: each hazard they look
    for, planted once, is reported (they read text, so a check that matched nothing would pass forever)."""
    funcs = {name: list(body) for name, body in disassembly.items()}
    assert not avx_called_from_baseline(funcs) and not level_instruction_problems(funcs)
    default = next(n for n in funcs if "pyfastpeft::DEFAULT::" in n)
    avx2 = next(n for n in funcs if _level_of(n) == "AVX2")
    ymm_line = "  1000:\tvaddps %ymm1,%ymm2,%ymm3"
    cases = {
        # the linker kept a level's copy of an inline helper that the baseline calls (directly, or
        # through the PLT as default visibility makes it)
        "direct": ({"inline_helper<float>()": [ymm_line]}, "  2000:\tcall   3000 <inline_helper<float>()>"),
        "plt": ({"inline_helper<float>()": [ymm_line]}, "  2000:\tcall   3000 <inline_helper<float>()@plt>"),
        "scalar vex": (
            {"inline_helper<float>()": ["  1000:\tvaddss %xmm1,%xmm2,%xmm3"]},
            "  2000:\tjmp    3000 <inline_helper<float>()+0x10>",
        ),
    }
    for case, (extra, call) in cases.items():
        doctored = {**funcs, **extra, default: [*funcs[default], call]}
        assert avx_called_from_baseline(doctored), case
    for line in (ymm_line, "  1000:\tvfmadd231ss %xmm1,%xmm2,%xmm3"):
        assert level_instruction_problems({**funcs, default: [*funcs[default], line]}), line
    for line in ("  1000:\tvaddps %zmm1,%zmm2,%zmm3", "  1000:\tvaddps %ymm17,%ymm2,%ymm3", "  1000:\tkmovw %eax,%k1"):
        assert level_instruction_problems({**funcs, avx2: [*funcs[avx2], line]}), line
    for register in ("%zmm", "%ymm"):  # a level's Philox rounds gone
        without = {n: [x for x in b if not _philox_multiply(x, register)] for n, b in funcs.items()}
        assert level_instruction_problems(without), register


# ---- every runnable level computes the same results --------------------------------------------------
@pytest.fixture(scope="module")
def level_results(tmp_path_factory):
    results = {}
    script = Path(probe.__file__)
    for level in RUNNABLE:
        path = tmp_path_factory.mktemp("levels") / f"{level}.safetensors"
        out = run_python(
            f"import runpy, sys; sys.argv = ['probe', {str(path)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')",
            level,
        )
        assert out.returncode == 0, out.stderr
        results[level] = load_file(str(path))
        assert bytes(results[level]["level"].tolist()).decode() == level
    return results


def test_each_level_is_deterministic(level_results):
    for level, res in level_results.items():
        flaky = [k for k, v in res.items() if k.endswith(".deterministic") and not bool(v)]
        assert not flaky, f"{level}: two runs differ in {flaky}"


def test_philox_masks_are_bit_identical_across_levels(level_results):
    ref = probe._mask()  # this process's level
    keep = reference.philox_keep_mask(1000 * 3, 0.3, seed=7, offset=0).reshape(3, 1000)
    for level, res in level_results.items():
        assert torch.equal(res["mask/f32"], ref["f32"]), level
        assert torch.equal(res["mask/f64"] != 0, keep), level
        for case in ("lora_drop.f32", "lora_drop.f64", "lora_drop.bf16"):
            # which elements of dA are exactly zero depends only on the mask's columns that no row keeps
            assert torch.equal(res[f"{case}/dA"] == 0, level_results[RUNNABLE[0]][f"{case}/dA"] == 0), (level, case)


def _bound_terms(case: str, key: str, outputs: torch.Tensor) -> tuple[int, float]:
    """(k, S): the longest sum behind the output has k terms whose absolute values add up to at most S
    (float64 runs of the same products on absolute values; dropout scales every kept term by 1/(1 − p))."""
    a = {k: v.double().abs() if v.is_floating_point() else v for k, v in probe.inputs().items()}
    n, d_in = a["x"].shape
    d_out, vocab = a["weight"].shape[0], a["teacher"].shape[1]
    x, g, W = a["x"], a["grad_y"], a["weight"]
    if case.startswith(("lora", "multi_lora")):
        if case.startswith("lora"):
            A, B, s = a["lora_A"], a["lora_B"], 1.5 / 0.75
        else:  # any adapter: the elementwise largest of the stack, the largest scaling
            A, B, s = a["stack_A"].amax(0), a["stack_B"].amax(0), 2.0 / 0.8
        r = A.shape[0]
        terms = {
            "y": (d_in + r + 1, x @ W.t() + a["bias"] + s * (x @ A.t()) @ B.t()),
            "dx": (d_out + r, g @ W + s * (g @ B) @ A),
            "dA": (n + d_out, s * (g @ B).t() @ x),
            "dB": (n + r, s * g.t() @ (x @ A.t())),
            "dW": (n, g.t() @ x),
        }[key]
        return terms[0], terms[1].max().item()
    if case.startswith("ia3_bias"):
        gi = x.flip(0)
        return {
            "ia3.dx": (1, (gi * a["ia3_scale"]).max().item()),
            "ia3.dl": (n, (gi * x).sum(0).max().item()),
            "bias.dx": (d_out, (g @ W).max().item()),
            "bias.db": (n, g.sum(0).max().item()),
        }[key]
    if case.startswith("sparse"):
        return n, (g.t() @ x).max().item()
    if case.startswith("distill"):
        # per token: softmax terms (each ≤ 1) weighted by α, (1 − α)·T and 1/tokens; the loss adds the
        # log-sum-exps, at most max|logit|/T + log V per token
        if key == "ds":
            return vocab, 2 * (0.3 + 0.7 * 2.0) / n
        return 4 * vocab, 4 * (
            a["student"].max().item() + a["teacher"].max().item() + torch.log(torch.tensor(vocab)).item()
        )
    if case.startswith("quant"):
        if key == "lsq.dscale":  # Σ over a channel of |g|·|∂q/∂s| ≤ |g|·2^bits, times LSQ's gradient factor
            factor = 1.0 / (d_in * 7) ** 0.5
            return d_in, (x.flip(0).sum(1) * 16 * factor).max().item()
        return 8, outputs.double().abs().max().item()  # elementwise: a few roundings of values of this size
    if case.startswith("optim"):
        if key == "norm":
            return n * d_in + a["grad"].numel(), outputs.double().max().item() ** 2
        # elementwise, three steps of a dozen roundings; every term is bounded by the largest state
        big = max(a[k].max().item() for k in ("param", "grad", "exp_avg", "exp_avg_sq"))
        return 40, max(big, outputs.double().abs().max().item(), 1.0)
    raise KeyError(case)


@pytest.mark.parametrize("case", [c for c in probe.CASES if c != "mask"])
def test_levels_agree_within_rounding(level_results, case):
    """|a − b| ≤ 2·k·eps·S between any two levels: each level's sum of k terms of absolute sum S is
    within k·eps·S of the exact value (eps of the accumulation type). 16-bit outputs may also differ by
    one rounding of the result (their sums run in float32 and are rounded once)."""
    levels = list(level_results)
    if len(levels) < 2:
        pytest.skip("this machine runs a single level")
    base = level_results[levels[0]]
    keys = [k.split("/", 1)[1] for k in base if k.startswith(case + "/")]
    assert keys
    for key in keys:
        ref = base[f"{case}/{key}"]
        if not ref.is_floating_point():  # zero points: from the same float min/max
            for level in levels[1:]:
                assert torch.equal(level_results[level][f"{case}/{key}"], ref), (case, key, level)
            continue
        acc_eps = torch.finfo(torch.float64 if ref.dtype == torch.float64 else torch.float32).eps
        k, total = _bound_terms(case, key, ref)
        bound = 2 * k * acc_eps * total
        for level in levels[1:]:
            got = level_results[level][f"{case}/{key}"].double()
            diff = (got - ref.double()).abs()
            if ref.dtype in (torch.bfloat16, torch.float16):
                diff = (diff - torch.finfo(ref.dtype).eps * torch.maximum(got.abs(), ref.double().abs())).clamp_min(0)
            assert diff.max().item() <= bound, (case, key, level, diff.max().item(), bound)
