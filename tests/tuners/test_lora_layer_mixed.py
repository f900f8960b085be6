"""The LoRA layer's mixed-batch mode (``layer(x, adapter_names=[...])``, one adapter per sequence, one op
call): equal to running each adapter's own single-adapter layer on its own sequences."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pf
from pyfastpeft.ops import BASE_ADAPTER, reference
from pyfastpeft.tuners import LoraLinear
from tests.conftest import assert_as_accurate_as, assert_within_rounding, low_precision_error_bound

ADAPTERS = {"fr": (4, 8.0), "de": (2, 3.0), "es": (3, 6.0)}  # name: (r, alpha); different ranks on purpose
IN, OUT = 13, 11


def add_adapter(layer: LoraLinear, name: str, r: int, alpha: float, dropout: float = 0.0) -> None:
    layer.update_layer(name, r, alpha, dropout, False, False, True)


def make_layer(device, dtype=torch.float64, seed=0, bias=True, in_features=IN, out_features=OUT, adapters=ADAPTERS):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias).to(device=device, dtype=dtype)
    first, *rest = adapters.items()
    layer = LoraLinear(base, first[0], r=first[1][0], lora_alpha=first[1][1])
    for name, (r, alpha) in rest:
        add_adapter(layer, name, r, alpha)
    for name in adapters:
        with torch.no_grad():  # B starts at zero; make every adapter matter
            layer.lora_B[name].weight.normal_()
    for p in lora_parameters(layer).values():  # train every adapter, not only the active one
        p.requires_grad_(True)
    return layer


def lora_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in layer.named_parameters() if "lora_" in n}


def single_adapter_layers(layer: LoraLinear, convert=lambda t: t) -> dict[str, LoraLinear]:
    """One single-adapter LoraLinear per adapter, sharing nothing with ``layer`` but holding ``convert`` of
    its values (float64, or absolute values for the sums' magnitudes)."""
    out = {}
    for name in layer.adapters:
        base = copy.deepcopy(layer.base_layer)
        with torch.no_grad():
            for p in base.parameters():
                p.copy_(convert(p))
        single = LoraLinear(base, name, r=layer.r[name], lora_alpha=layer.lora_alpha[name])
        with torch.no_grad():
            single.lora_A[name].weight.copy_(convert(layer.lora_A[name].weight))
            single.lora_B[name].weight.copy_(convert(layer.lora_B[name].weight))
        out[name] = single
    return out


def run_separately(layer: LoraLinear, x: torch.Tensor, grad_y: torch.Tensor, names: list[str], convert=lambda t: t):
    """Each sequence through its own adapter's single layer (the base alone for "__base__"): the output,
    dx and each adapter's dA, dB summed over its sequences."""
    singles = single_adapter_layers(layer, convert)
    outs, dxs = [], []
    for i, name in enumerate(names):
        xi = convert(x[i].detach()).requires_grad_()
        yi = singles[next(iter(singles))].base_layer(xi) if name == BASE_ADAPTER else singles[name](xi)
        yi.backward(convert(grad_y[i]))
        outs.append(yi.detach())
        dxs.append(xi.grad)
    grads = {}
    for name, single in singles.items():
        for factor in ("lora_A", "lora_B"):
            weight = getattr(single, factor)[name].weight
            grads[f"{factor}.{name}.weight"] = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    return torch.stack(outs), torch.stack(dxs), grads


@pytest.mark.parametrize("seq_len", [7, 40])  # short sequences: sorted path; long: in place (CPU)
def test_mixed_batch_equals_each_adapter_alone_outputs_and_gradients(device, seq_len):
    """In float64: the mixed batch and the separate runs are two summation orders of the same sums, each
    within the rounding bound of the exact result (terms: the longest chain, dA's sum over tokens and out)."""
    layer = make_layer(device)
    names = ["fr", BASE_ADAPTER, "de", "fr", "es"]
    x = torch.randn(5, seq_len, IN, dtype=torch.float64, device=device)
    grad_y = torch.randn(5, seq_len, OUT, dtype=torch.float64, device=device)
    x_mixed = x.clone().requires_grad_()
    y = layer(x_mixed, adapter_names=names)
    y.backward(grad_y)

    y_sep, dx_sep, grads_sep = run_separately(layer, x, grad_y, names)
    y_abs, dx_abs, grads_abs = run_separately(layer, x.abs(), grad_y.abs(), names, lambda t: t.detach().abs())
    terms = 2 * (5 * seq_len + IN + OUT + 4)  # both sides round: twice one side's chain
    assert_within_rounding("y", y, y_sep, y_abs, terms=terms, roundings=2)
    assert_within_rounding("dx", x_mixed.grad, dx_sep, dx_abs, terms=terms, roundings=2)
    for key, p in lora_parameters(layer).items():  # each adapter's gradient sums over its sequences
        assert_within_rounding(key, p.grad, grads_sep[key], grads_abs[key], terms=terms, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_len", [7, 40])
def test_mixed_batch_against_float64_reference(device, dtype, seq_len):
    """Outputs and every gradient of a mixed batch (x a strided view, the layer cast with .to(dtype))
    against the float64 formula run per sequence: within twice plain PyTorch's error in the same dtype,
    plus two roundings of the sums' absolute terms."""
    layer = make_layer(device).to(dtype)
    names = ["fr", BASE_ADAPTER, "de", "fr", "es"]
    x = torch.randn(5, seq_len, 2 * IN, dtype=torch.float64, device=device).to(dtype)[..., ::2].requires_grad_()
    grad_y = torch.randn(5, seq_len, OUT, dtype=torch.float64, device=device).to(dtype)
    y = layer(x, adapter_names=names)
    trained = lora_parameters(layer)
    ours = [y, *torch.autograd.grad(y, [x, *trained.values()], grad_y)]

    def per_sequence(convert):
        leaves = {n: convert(p.detach()).requires_grad_() for n, p in trained.items()}
        w, b = (convert(t.detach()) for t in (layer.base_layer.weight, layer.base_layer.bias))
        xs = convert(x.detach()).requires_grad_()
        outs = []
        for i, name in enumerate(names):
            if name == BASE_ADAPTER:
                outs.append(torch.nn.functional.linear(xs[i], w, b))
            else:
                a, bb = leaves[f"lora_A.{name}.weight"], leaves[f"lora_B.{name}.weight"]
                outs.append(reference.lora_linear(xs[i], w, b, a, bb, layer.scaling[name]))
        out = torch.stack(outs)
        return [out, *torch.autograd.grad(out, [xs, *leaves.values()], convert(grad_y), allow_unused=True)]

    ref64 = per_sequence(lambda t: t.double())
    lowp = per_sequence(lambda t: t.clone())
    magnitude = per_sequence(lambda t: t.double().abs())
    for name, o, t, r, m in zip(["y", "dx", *trained], ours, lowp, ref64, magnitude, strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        err, bound = low_precision_error_bound(o.cpu(), t.cpu(), r.cpu(), magnitude=m.cpu())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_names_on_the_layer_and_through_peft_model_agree(device):
    """``layer(x, adapter_names=...)`` is the mode PeftModel(..., adapter_names=...) sets on every layer:
    bit for bit the same; without names the active adapter runs; bad names are refused."""
    layer = make_layer(device)
    x = torch.randn(4, 6, IN, dtype=torch.float64, device=device)
    names = ["es", "fr", BASE_ADAPTER, "es"]
    by_names = layer(x, adapter_names=names)

    model = nn.Sequential()
    model.add_module("proj", copy.deepcopy(layer.base_layer))
    peft = pf.get_peft_model(model, pf.LoraConfig(r=4, lora_alpha=8.0, target_modules=["proj"]), "fr")
    for name, (r, alpha) in list(ADAPTERS.items())[1:]:
        peft.add_adapter(name, pf.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    installed = peft.get_base_model().proj
    installed.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(peft(x, adapter_names=names), by_names)

    assert layer.active_adapters == ["fr"]
    abs_layer = copy.deepcopy(layer)
    with torch.no_grad():
        for p in abs_layer.parameters():
            p.abs_()
        magnitude = abs_layer(x.abs())
    mixed = layer(x, adapter_names=["fr"] * 4)
    assert_within_rounding("y", mixed, layer(x), magnitude, terms=2 * (IN + 5), roundings=2)
    with pytest.raises(ValueError, match="adapter_names: 3 names for a batch of shape"):
        layer(x, adapter_names=names[:3])
    with pytest.raises(ValueError, match=r"adapter_names: unknown adapter\(s\) \['it'\]"):
        layer(x, adapter_names=["it", "fr", "fr", "fr"])
    with pytest.raises(ValueError, match="adapter_names: expected a list of adapter names"):
        layer(x, adapter_names="fr")
    layer.merge(["fr"])
    with pytest.raises(ValueError, match="adapter_names: unmerge the adapters first"):
        layer(x, adapter_names=names)


def test_adapter_bookkeeping():
    layer = make_layer("cpu")
    assert layer.adapters == ["fr", "de", "es"]
    assert layer.scaling == {"fr": 2.0, "de": 1.5, "es": 2.0}
    layer.delete_adapter("fr")
    assert layer.adapters == ["de", "es"]
    assert set(dict(layer.named_parameters())) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.de.weight",
        "lora_B.de.weight",
        "lora_A.es.weight",
        "lora_B.es.weight",
    }
    assert [p.requires_grad for p in layer.base_layer.parameters()] == [False, False]
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    y = layer(x, adapter_names=["es", "de"])  # the indices follow the deletion
    singles = single_adapter_layers(layer)
    ref = torch.stack([singles["es"](x[0]), singles["de"](x[1])])
    mags = torch.stack(
        [single_adapter_layers(layer, lambda t: t.detach().abs())[n](x[i].abs()) for i, n in enumerate(["es", "de"])]
    )
    assert_within_rounding("y", y, ref, mags, terms=2 * (IN + 4), roundings=2)


def test_training_step_on_a_mixed_batch_updates_only_the_adapters_used(device):
    layer = make_layer(device, dtype=torch.float32)
    frozen = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    before = {k: v.detach().clone() for k, v in lora_parameters(layer).items()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(3, 5, IN, device=device)
    for _ in range(2):
        opt.zero_grad()
        layer(x, adapter_names=["fr", "es", BASE_ADAPTER]).square().mean().backward()
        opt.step()
    for k, v in layer.base_layer.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen {k} changed"
    after = lora_parameters(layer)
    for name in ("fr", "es"):
        assert not torch.equal(after[f"lora_A.{name}.weight"].detach(), before[f"lora_A.{name}.weight"])
    assert torch.equal(after["lora_A.de.weight"].detach(), before["lora_A.de.weight"])  # no tokens, zero gradient
    assert torch.equal(after["lora_B.de.weight"].detach(), before["lora_B.de.weight"])


def test_dropout_in_training_only_and_one_rate_per_batch():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), "a", r=2, lora_dropout=0.5)
    add_adapter(layer, "b", 2, 8.0, dropout=0.5)
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(2, 64, 8)
    layer.eval()
    y_eval = layer(x, adapter_names=["a", "b"])
    layer.train()
    assert not torch.equal(layer(x, adapter_names=["a", "b"]), y_eval)
    add_adapter(layer, "c", 2, 8.0, dropout=0.1)
    with pytest.raises(ValueError, match="must share lora_dropout"):
        layer(x, adapter_names=["a", "c"])


def test_torch_compile_fullgraph_module(device):
    layer = make_layer(device, dtype=torch.float32)
    layer64 = copy.deepcopy(layer).double()
    names = ["fr", "es", BASE_ADAPTER, "de"]
    x = torch.randn(4, 5, IN, device=device)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x, adapter_names=names)
    y.sum().backward()
    grads = {k: v.grad.clone() for k, v in lora_parameters(layer).items()}
    layer.zero_grad()
    y_eager = layer(x, adapter_names=names)
    y_eager.sum().backward()
    y64 = layer64(x.double(), adapter_names=names)
    y64.sum().backward()
    assert_as_accurate_as("compiled y", y, y_eager, y64)
    for k, p in lora_parameters(layer).items():
        assert_as_accurate_as(f"compiled {k}", grads[k], p.grad, lora_parameters(layer64)[k].grad)


def test_inference_stack_cache_follows_in_place_updates_replacements_and_new_adapters(device):
    layer = make_layer(device)
    x = torch.randn(3, 4, IN, dtype=torch.float64, device=device)
    names = ["fr", "de", "es"]
    with torch.no_grad():
        first = layer(x, adapter_names=names)
        assert torch.equal(layer(x, adapter_names=names), first)
        layer.lora_B["de"].weight.mul_(2.0)  # in place, as an optimizer step would
        second = layer(x, adapter_names=names)
        assert torch.equal(second[0], first[0]) and not torch.allclose(second[1], first[1])
        # a parameter replaced in the container (not updated in place) must reach the stack too
        layer.lora_B["es"].weight = nn.Parameter(layer.lora_B["es"].weight.detach() + 1.0)
        third = layer(x, adapter_names=names)
        assert torch.equal(third[0], first[0]) and not torch.allclose(third[2], second[2])
        add_adapter(layer, "it", 5, 5.0)
        layer.lora_B["it"].weight.normal_()
        fourth = layer(x, adapter_names=["it", "de", "es"])
    singles = single_adapter_layers(layer)
    abs_singles = single_adapter_layers(layer, lambda t: t.detach().abs())
    for i, name in enumerate(["it", "de", "es"]):
        with torch.no_grad():
            ref, mag = singles[name](x[i]), abs_singles[name](x[i].abs())
        assert_within_rounding(f"y[{name}]", fourth[i], ref, mag, terms=2 * (IN + 5 + 1), roundings=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_stack_in_the_kernels_layout_gives_the_training_path_output(device, dtype):
    """With autograd off the stack is held transposed (Aᵀ when r is a whole number of packs, Bᵀ) for
    the CPU kernels to read in place: same values, same shapes, and the training path's output up to the
    two runs' summation orders."""
    adapters = {"a": (16, 32.0), "b": (16, 32.0), "c": (9, 18.0)}
    layer = make_layer(device, dtype=dtype, in_features=70, out_features=83, adapters=adapters)
    names = ["a", "c", "b", "a", BASE_ADAPTER]
    x = torch.randn(5, 40, 70, dtype=dtype, device=device)
    trained = layer(x, adapter_names=names).detach()
    with torch.no_grad():
        present = layer.adapters
        A, B = layer._mixed_stack(present, dtype)
        plain_A, plain_B = layer._stack_adapters(present, dtype)
        assert torch.equal(A, plain_A) and torch.equal(B, plain_B)
        if device == "cpu":
            assert B.transpose(1, 2).is_contiguous() and A.transpose(1, 2).is_contiguous()  # r_max 16: Aᵀ too
        served = layer(x, adapter_names=names)
        abs_layer = copy.deepcopy(layer).double()
        for p in abs_layer.parameters():
            p.abs_()
        magnitude = abs_layer(x.double().abs(), adapter_names=names)
    assert_within_rounding("served y", served, trained, magnitude, terms=2 * (70 + 16 + 1), roundings=2)
