"""`dora`, DoRA with the factored row norm: the norm is exact, the layer is PEFT's DoRA (same
logits, same gradients), and it never allocates an [out, in] (or [in, in]) tensor."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from subspace_cli.walk import block_linears, find_blocks
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.methods.adapt import dora
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.adapt.dora import DoraLayer, factored_row_norm
from subspace_cli.methods.adapt.lora_family import LoraConfig
from subspace_cli.methods.catalog import methods_for


def _rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("out,inp,r", [(1, 5, 1), (33, 20, 4), (64, 130, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_factored_norm_is_the_dense_norm(out, inp, r, dtype, tol):
    # B ≠ 0 and large (s·B·A comparable to W), so all three terms of the expansion matter.
    W, A = _rand(out, inp, seed=1, dtype=dtype), _rand(r, inp, seed=2, dtype=dtype)
    B = _rand(out, r, seed=3, dtype=dtype)
    dense = (W.double() + 0.7 * B.double() @ A.double()).norm(dim=1)  # ‖W + sBA‖_row in float64
    got = factored_row_norm(W, A, B, 0.7)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (out,)
    assert _rel(got, dense) < tol  # measured ~1e-16 (fp64), ~4e-8 (fp32)
    assert _rel(factored_row_norm(W, A, B, 0.7, weight_sq=W.double().square().sum(1)), dense) < tol


def test_factored_norm_of_low_precision_weight_in_row_blocks(monkeypatch):
    # A bf16 W is upcast a block of rows at a time; make the blocks 3 rows so the loop runs.
    monkeypatch.setattr(dora, "_BLOCK", 3 * 40)
    W = _rand(50, 40, seed=4, dtype=torch.bfloat16)
    A, B = _rand(8, 40, seed=5, dtype=torch.float32), _rand(50, 8, seed=6, dtype=torch.float32)
    dense = (W.double() + 0.5 * B.double() @ A.double()).norm(dim=1)  # the bf16 values, exactly
    got = factored_row_norm(W, A, B, 0.5)
    assert got.dtype == torch.float32 and _rel(got, dense) < 1e-5  # measured 4e-8


def test_factored_norm_of_a_cancelled_row_is_zero_not_nan():
    # Row 0 of W + sBA is exactly zero: the squared norm cancels to ±rounding; clamped, never NaN.
    A, B = _rand(2, 16, seed=7, dtype=torch.float32), _rand(5, 2, seed=8, dtype=torch.float32)
    W = _rand(5, 16, seed=9, dtype=torch.float32)
    W[0] = -(2.0 * B[0] @ A)
    norm = factored_row_norm(W, A, B, 2.0)
    assert torch.isfinite(norm).all() and norm[0] < 1e-3 * norm[1:].min()


def test_init_is_the_base_layer_and_follows_the_generator():
    base = nn.Linear(24, 10)
    make = lambda seed: DoraLayer(base, 4, 8.0, LoraConfig(), torch.Generator().manual_seed(seed))  # noqa: E731
    layer, again, other = make(0), make(0), make(1)
    assert torch.equal(layer.lora_A, again.lora_A) and not torch.equal(layer.lora_A, other.lora_A)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(24)  # Kaiming-uniform, a=√5: bound 1/√fan_in
    assert torch.equal(layer.lora_B, torch.zeros(10, 4)) and layer.scaling == 2.0
    torch.testing.assert_close(layer.magnitude, base.weight.norm(dim=1), rtol=1e-6, atol=0)  # m₀ = ‖W‖_row
    x = _rand(3, 24, seed=10, dtype=torch.float32)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)  # B = 0, m = ‖W‖: the base layer
    delta = layer.lora_delta()
    assert delta.magnitude is not None and delta.A.shape == (4, 24) and delta.B.shape == (10, 4)


def _build(path, method, seed=0):
    """(model, {layer path: adapter layer}) for a registered method on every Linear of the blocks."""
    model = load_model_and_tokenizer(str(path), with_tokenizer=False).model
    blocks = find_blocks(model)
    layers = {}
    for i, block in enumerate(blocks.modules):
        layers.update(block_linears(block, blocks.block_path(i)))
    registered = methods_for("adapt")[method]
    adapted = registered.attach(model, layers, 2, 4.0, registered.make_config({"dropout": 0.1}),
                               AdaptContext(torch.Generator().manual_seed(seed)))
    root = adapted.model.base_model.model if method == "dora-peft" else adapted.model
    return adapted, {p: root.get_submodule(p) for p in layers}


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])  # Linear without bias; Conv1D with bias
def test_same_logits_and_gradients_as_peft_dora(model_name, request):
    path = request.getfixturevalue(model_name)
    ours, mine = _build(path, "dora")
    theirs, peft_layers = _build(path, "dora-peft")
    assert ours.use_dora and theirs.use_dora and methods_for("adapt")["dora"].default_lr == 2e-4
    with torch.no_grad():  # PEFT's A; a random nonzero B, a moved magnitude, random biases in both
        for i, (p, layer) in enumerate(mine.items()):
            theirs_layer = peft_layers[p]
            magnitude = theirs_layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.1 * _rand(*magnitude.shape, seed=100 + i, dtype=torch.float32))
            theirs_layer.lora_B["default"].weight.copy_(_rand(*layer.lora_B.shape, seed=i, dtype=torch.float32))
            layer.lora_A.copy_(theirs_layer.lora_A["default"].weight)
            layer.lora_B.copy_(theirs_layer.lora_B["default"].weight)
            layer.magnitude.copy_(magnitude)
            if layer.base.bias is not None:  # GPT-2 starts with zero biases: give them values, same in both
                layer.base.bias.copy_(_rand(*layer.base.bias.shape, seed=200 + i, dtype=torch.float32))
                theirs_layer.get_base_layer().bias.copy_(layer.base.bias)
    ids = torch.arange(2 * 24).reshape(2, 24) % 60 + 4
    for train in (False, True):  # eval: base reused from base(x); train: dropout 0.1, W·dropout(x) recomputed
        logits = {}
        for name, adapted in (("ours", ours), ("theirs", theirs)):
            adapted.model.train(train).zero_grad()
            torch.manual_seed(1)  # the same dropout masks: both draw one per layer, in the same order
            logits[name] = adapted.model(input_ids=ids).logits
            logits[name].float().log_softmax(-1)[..., 5].mean().backward()
        err = (logits["ours"] - logits["theirs"]).abs().max().item()
        assert err < 1e-4, f"train={train}: max |Δlogit| {err:.2e}"  # measured ≤ 1.2e-7
        assert (logits["ours"] - _logits_of_base(path, ids)).abs().max() > 1e-2  # the adapters do something
        for p, layer in mine.items():
            theirs_layer = peft_layers[p]
            pairs = {"A": (layer.lora_A, theirs_layer.lora_A["default"].weight),
                     "B": (layer.lora_B, theirs_layer.lora_B["default"].weight),
                     "magnitude": (layer.magnitude, theirs_layer.lora_magnitude_vector["default"].weight)}
            for name, (a, b) in pairs.items():
                assert b.grad.abs().max() > 0, f"{p}.{name}: PEFT's gradient is zero, the test would be vacuous"
                torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4,
                                           msg=f"train={train} {p}.{name}")  # measured ≤ 1.2e-8, |grad| ≤ 0.07


def _logits_of_base(path, ids):
    with torch.no_grad():
        return load_model_and_tokenizer(str(path), with_tokenizer=False).model(input_ids=ids).logits


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (views of its inputs excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), tuple(t.shape)))
        return out


def _largest_allocation(layer, x):
    x = x.clone().requires_grad_()  # as mid-network, where the input needs its gradient
    layer.train()
    with _Allocations() as record:
        layer(x).float().sum().backward()
    assert any("mm" in op for op, _ in record.sizes)  # the recorder saw the matmuls, backward's included
    return max(record.sizes, key=lambda s: math.prod(s[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_never_allocate_out_by_in(dtype, monkeypatch):
    """Every tensor the layer allocates holds at most max(N, r)·max(out, in) elements: [N, out],
    [N, in], [out, r], [r, in], never B·A [out, in] nor PEFT's identity [in, in]."""
    import peft

    monkeypatch.setattr(dora, "_BLOCK", 8 * 80)  # bf16 W upcast 8 rows at a time
    n, inp, out, r = 8, 80, 96, 4
    base = nn.Linear(inp, out).to(dtype)
    layer = DoraLayer(base, r, 8.0, LoraConfig(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = _rand(n, inp, seed=11, dtype=dtype)
    op, shape = _largest_allocation(layer, x)
    assert math.prod(shape) <= max(n, r) * max(out, inp), f"{op} allocated {shape}"

    # The same check catches PEFT's dense norm (so it is not vacuous).
    holder = nn.Module()
    holder.lin = nn.Linear(inp, out).to(dtype)
    peft.inject_adapter_in_model(peft.LoraConfig(r=r, target_modules=["lin"], use_dora=True), holder)
    _, shape = _largest_allocation(holder.lin, x)
    assert math.prod(shape) >= inp * inp
