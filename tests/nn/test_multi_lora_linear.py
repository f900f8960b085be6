"""MultiLoRALinear: named adapters, mixed batches equal to each adapter's LoRALinear run alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfastpeft.nn import BASE_ADAPTER, LoRALinear, MultiLoRALinear, adapter_indices_from_names
from pyfastpeft.ops import reference
from tests.conftest import low_precision_error_bound

ADAPTERS = {"fr": (4, 8.0), "de": (2, 3.0), "es": (3, 6.0)}  # name: (r, alpha); different ranks on purpose


def make_layer(device, dtype=torch.float64, seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(13, 11, bias=bias).to(device=device, dtype=dtype)
    layer = MultiLoRALinear(base)
    for name, (r, alpha) in ADAPTERS.items():
        layer.add_adapter(name, r=r, alpha=alpha)
        with torch.no_grad():  # B starts at zero; make every adapter matter
            layer.lora_B[name].normal_()
    return layer


def single_adapter_layers(layer: MultiLoRALinear) -> dict[str, LoRALinear]:
    """One LoRALinear per adapter, sharing nothing with `layer` but holding copies of its weights."""
    out = {}
    for name in layer.adapter_names:
        base = nn.Linear(layer.in_features, layer.out_features, bias=layer.base_layer.bias is not None)
        base = base.to(dtype=layer.base_layer.weight.dtype, device=layer.base_layer.weight.device)
        base.load_state_dict(layer.base_layer.state_dict())
        single = LoRALinear(base, r=layer.r[name], alpha=layer.lora_alpha[name])
        with torch.no_grad():
            single.lora_A.copy_(layer.lora_A[name])
            single.lora_B.copy_(layer.lora_B[name])
        out[name] = single
    return out


def test_adapter_bookkeeping():
    layer = make_layer("cpu")
    assert layer.adapter_names == ["fr", "de", "es"]
    assert layer.adapter_index("de") == 1 and layer.adapter_index(BASE_ADAPTER) == -1
    assert layer.scaling == {"fr": 2.0, "de": 1.5, "es": 2.0}
    layer.delete_adapter("fr")
    assert layer.adapter_names == ["de", "es"] and layer.adapter_index("es") == 1
    assert set(dict(layer.named_parameters())) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.de",
        "lora_B.de",
        "lora_A.es",
        "lora_B.es",
    }
    assert [p.requires_grad for p in layer.base_layer.parameters()] == [False, False]
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("de")
    with pytest.raises(ValueError, match="name: expected a non-empty str"):
        layer.add_adapter(BASE_ADAPTER)
    with pytest.raises(ValueError, match="no adapter 'fr'"):
        layer.delete_adapter("fr")
    with pytest.raises(ValueError, match="r: expected a positive int"):
        layer.add_adapter("it", r=0)
    with pytest.raises(ValueError, match="base_layer: expected an nn.Linear"):
        MultiLoRALinear(nn.Conv1d(2, 2, 1))


def test_indices_from_names_per_sequence_and_ragged():
    names = ["fr", "de", "es"]
    got = adapter_indices_from_names(["de", BASE_ADAPTER, "fr"], names, 2)
    assert got.tolist() == [1, 1, -1, -1, 0, 0]
    got = adapter_indices_from_names(["es", "fr"], names, [3, 1])
    assert got.tolist() == [2, 2, 2, 0] and got.dtype == torch.int64
    with pytest.raises(ValueError, match="unknown adapter 'it'"):
        adapter_indices_from_names(["it"], names, 2)
    with pytest.raises(ValueError, match="tokens_per_sequence: expected 2 lengths"):
        adapter_indices_from_names(["es", "fr"], names, [3])


@pytest.mark.parametrize("seq_len", [7, 40])  # short sequences: sorted path; long: in place (CPU)
def test_mixed_batch_equals_each_adapter_alone_outputs_and_gradients(device, seq_len):
    layer = make_layer(device)
    singles = single_adapter_layers(layer)
    names = ["fr", BASE_ADAPTER, "de", "fr", "es"]
    x = torch.randn(5, seq_len, 13, dtype=torch.float64, device=device)
    grad_y = torch.randn(5, seq_len, 11, dtype=torch.float64, device=device)
    x_mixed = x.clone().requires_grad_()
    y = layer(x_mixed, adapter_names=names)
    y.backward(grad_y)

    for i, name in enumerate(names):
        xi = x[i].clone().requires_grad_()
        if name == BASE_ADAPTER:
            yi = layer.base_layer(xi)
        else:
            yi = singles[name](xi)
        yi.backward(grad_y[i])
        torch.testing.assert_close(y[i], yi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_mixed.grad[i], xi.grad, rtol=1e-12, atol=1e-12)
    for name, single in singles.items():  # each adapter's gradient sums over its sequences
        torch.testing.assert_close(layer.lora_A[name].grad, single.lora_A.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lora_B[name].grad, single.lora_B.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_len", [7, 40])
def test_mixed_batch_against_float64_reference(device, dtype, seq_len):
    """Outputs and every gradient of a mixed batch (x a strided view) against the float64 formula run per
    sequence: within twice plain PyTorch's error in the same dtype, plus two roundings of the sums'
    absolute terms."""
    layer = make_layer(device).to(dtype)
    names = ["fr", BASE_ADAPTER, "de", "fr", "es"]
    x = torch.randn(5, seq_len, 26, dtype=torch.float64, device=device).to(dtype)[..., ::2].requires_grad_()
    grad_y = torch.randn(5, seq_len, 11, dtype=torch.float64, device=device).to(dtype)
    y = layer(x, adapter_names=names)
    trained = {n: p for n, p in layer.named_parameters() if p.requires_grad}
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
                a, bb = leaves[f"lora_A.{name}"], leaves[f"lora_B.{name}"]
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


def test_indices_per_sequence_per_token_and_names_agree(device):
    layer = make_layer(device)
    x = torch.randn(4, 6, 13, dtype=torch.float64, device=device)
    names = ["es", "fr", BASE_ADAPTER, "es"]
    by_names = layer(x, adapter_names=names)
    per_sequence = torch.tensor([2, 0, -1, 2], device=device)
    torch.testing.assert_close(layer(x, adapter_indices=per_sequence), by_names, rtol=0, atol=0)
    per_token = per_sequence[:, None].expand(4, 6)
    torch.testing.assert_close(layer(x, adapter_indices=per_token), by_names, rtol=0, atol=0)
    torch.testing.assert_close(layer(x, adapter_indices=per_token.reshape(-1).int()), by_names, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter_names: expected one name per sequence"):
        layer(x, adapter_names=names[:3])


def test_training_step_on_a_mixed_batch_updates_only_the_adapters_used(device):
    layer = make_layer(device, dtype=torch.float32)
    frozen = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    before = {k: v.detach().clone() for k, v in layer.named_parameters() if v.requires_grad}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(3, 5, 13, device=device)
    for _ in range(2):
        opt.zero_grad()
        layer(x, adapter_names=["fr", "es", BASE_ADAPTER]).square().mean().backward()
        opt.step()
    for k, v in layer.base_layer.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen {k} changed"
    for name in ("fr", "es"):
        assert not torch.equal(layer.lora_A[name].detach(), before[f"lora_A.{name}"])
    assert torch.equal(layer.lora_A["de"].detach(), before["lora_A.de"])  # no tokens, zero gradient
    assert torch.equal(layer.lora_B["de"].detach(), before["lora_B.de"])


def test_dropout_in_training_only_and_one_rate_per_batch():
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", r=2, dropout=0.5)
    layer.add_adapter("b", r=2, dropout=0.5)
    nn.init.normal_(layer.lora_B["a"])
    x = torch.randn(2, 64, 8)
    layer.eval()
    y_eval = layer(x, adapter_names=["a", "b"])
    layer.train()
    assert not torch.allclose(layer(x, adapter_names=["a", "b"]), y_eval)
    layer.add_adapter("c", r=2, dropout=0.1)
    with pytest.raises(ValueError, match="one dropout rate"):
        layer(x, adapter_names=["a", "c"])


def test_torch_compile_fullgraph_module(device):
    layer = make_layer(device, dtype=torch.float32)
    x = torch.randn(4, 5, 13, device=device)
    idx = torch.tensor([0, 2, -1, 1], device=device)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x, adapter_indices=idx)
    y.sum().backward()
    grads = {k: v.grad.clone() for k, v in layer.named_parameters() if v.requires_grad}
    layer.zero_grad()
    y_eager = layer(x, adapter_indices=idx)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    for k, v in layer.named_parameters():
        if v.requires_grad:
            torch.testing.assert_close(grads[k], v.grad, rtol=1e-6, atol=1e-6)


def test_module_cast_to_bfloat16_keeps_float64_scalings(device):
    layer = make_layer(device, dtype=torch.float32).to(torch.bfloat16)
    x = torch.randn(2, 3, 13, device=device, dtype=torch.bfloat16)
    y = layer(x, adapter_names=["de", "fr"])
    assert y.dtype == torch.bfloat16 and layer._scalings.dtype == torch.float64
    singles = single_adapter_layers(layer.double())
    ref = torch.stack([singles["de"](x[0].double()), singles["fr"](x[1].double())])
    assert (y.double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_inference_stack_cache_follows_in_place_updates_and_new_adapters(device):
    layer = make_layer(device)
    x = torch.randn(3, 4, 13, dtype=torch.float64, device=device)
    names = ["fr", "de", "es"]
    with torch.no_grad():
        first = layer(x, adapter_names=names)
        assert torch.equal(layer(x, adapter_names=names), first)
        layer.lora_B["de"].mul_(2.0)  # in place, as an optimizer step would
        second = layer(x, adapter_names=names)
        assert torch.equal(second[0], first[0]) and not torch.allclose(second[1], first[1])
        layer.add_adapter("it", r=5)
        layer.lora_B["it"].normal_()
        third = layer(x, adapter_names=["it", "de", "es"])
    singles = single_adapter_layers(layer)
    torch.testing.assert_close(third[0], singles["it"](x[0]), rtol=1e-12, atol=1e-12)
    assert adapter_indices_from_names([], names, 3).tolist() == []


def test_cached_indices_and_stack_follow_names_lengths_and_replaced_parameters(device):
    layer = make_layer(device)
    names = ["fr", "de", "es"]
    first = layer.indices_for(names, 2)
    assert layer.indices_for(names, 2) is first  # the same names again: built once
    assert layer.indices_for(["es", "fr", "de"], 2).tolist() == [2, 2, 0, 0, 1, 1]
    assert layer.indices_for(names, [1, 2, 1]).tolist() == [0, 1, 1, 2]
    layer.delete_adapter("fr")
    assert layer.indices_for(["de", "es"], 1).tolist() == [0, 1]  # indices shifted after the deletion
    x = torch.randn(2, 3, 13, dtype=torch.float64, device=device)
    with torch.no_grad():
        before = layer(x, adapter_names=["de", "es"])
        # a parameter replaced in the container (not updated in place) must reach the stack too
        layer.lora_B["es"] = torch.nn.Parameter(layer.lora_B["es"].detach() + 1.0)
        after = layer(x, adapter_names=["de", "es"])
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])
    singles = single_adapter_layers(layer)
    torch.testing.assert_close(after[1], singles["es"](x[1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_stack_in_the_kernels_layout_gives_the_training_path_output(device, dtype):
    """With autograd off the stack is held transposed (Aᵀ when r is a whole number of packs, Bᵀ) for
    the CPU kernels to read in place: same values, same shapes, same outputs as the training path."""
    torch.manual_seed(0)
    base = nn.Linear(70, 83).to(device=device, dtype=dtype)
    layer = MultiLoRALinear(base)
    for name, r in (("a", 16), ("b", 16), ("c", 9)):
        layer.add_adapter(name, r=r, alpha=2.0 * r)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    names = ["a", "c", "b", "a", "__base__"]
    x = torch.randn(5, 40, 70, dtype=dtype, device=device)
    trained = layer(x, adapter_names=names).detach()
    with torch.no_grad():
        A, B = layer.stacked_weights()
        plain_A, plain_B = layer._stack()
        assert torch.equal(A, plain_A) and torch.equal(B, plain_B)
        if device == "cpu":
            assert B.transpose(1, 2).is_contiguous() and A.transpose(1, 2).is_contiguous()  # r_max 16: Aᵀ too
        served = layer(x, adapter_names=names)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(served, trained, rtol=tol, atol=tol)
