"""DoRA's compose step y = result + (g − 1)·base + (g·lora)·s: reference, Triton kernel, the op.

The Triton kernel runs in the CPU interpreter here (conftest sets TRITON_INTERPRET=1); the op
takes it on CPU tensors only inside `interpret_on_cpu()`.
"""

import contextlib
import time

import pytest
import torch

from subspace_cli.kernels import dora_compose as dc
from subspace_cli.kernels.dora_compose import (
    dora_compose,
    dora_compose_reference,
    dora_compose_triton,
)
from subspace_cli.kernels.triton_support import interpret_on_cpu

# The op's two paths on CPU: the torch reference, and the Triton kernel in the interpreter.
PATHS = [pytest.param(contextlib.nullcontext, id="reference"),
         pytest.param(interpret_on_cpu, id="triton",
                      marks=pytest.mark.skipif(dc.dora_compose_kernel is None, reason="needs triton"))]

FP32_REL = 1e-5  # ‖Δ‖/‖ref‖ in fp32; measured 0.0 (the kernel does the reference's fp32 ops in its order)
# Half outputs are rounded once from the fp32 sum. The interpreter truncates fp32 -> bf16 on store
# (its cast passes no rounding mode) where GPUs round to nearest, so allow one full bf16 step:
# |y − exact| ≤ 2^-7·|exact| per element (bf16 keeps 8 significant bits). fp16 rounds to nearest: 2^-11.
HALF_STEP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _inputs(n, out, seed, dtype=torch.float32, bias=True, base=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    return dict(result=t(n, out), lora=t(n, out), g=torch.rand(out, generator=g).to(dtype) + 0.5,
                bias=t(out) if bias else None, base=t(n, out) if base else None)


def _within_one_step(y, exact):
    """Every element of the half-precision y within one rounding step of the fp64 value."""
    bound = exact.abs() * HALF_STEP[y.dtype] + 1e-6
    return bool(((y.double() - exact).abs() <= bound).all())


def _peft_formula(result, lora, g, scaling, bias=None, base=None):
    """PEFT's DoraLinearLayer.forward plus the caller's `result + ...`, in float64."""
    result, lora, g = result.double(), lora.double(), g.double()
    if base is None:
        base = result - bias.double() if bias is not None else result
    return result + ((g - 1) * base.double() + g * lora * scaling)


@pytest.mark.parametrize("bias,base", [(False, False), (True, False), (False, True)])
def test_reference_is_peft_formula(bias, base):
    kw = _inputs(9, 20, seed=1, bias=bias, base=base)
    y = dora_compose_reference(scaling=0.5, **kw)
    assert y.dtype == torch.float32 and y.shape == (9, 20)
    assert _rel(y, _peft_formula(scaling=0.5, **kw)) < 1e-6  # measured ~6e-8


def test_reference_float64_and_leading_dims():
    kw = _inputs(12, 5, seed=2, dtype=torch.float64)
    kw = {k: (v.reshape(3, 4, 5) if v is not None and v.dim() == 2 else v) for k, v in kw.items()}
    y = dora_compose_reference(scaling=2.0, **kw)
    assert y.shape == (3, 4, 5) and y.dtype == torch.float64
    torch.testing.assert_close(y, _peft_formula(scaling=2.0, **kw), rtol=1e-14, atol=1e-14)


def test_dispatcher_uses_reference_on_cpu():
    kw = _inputs(4, 6, seed=3)
    assert torch.equal(dora_compose(scaling=0.3, **kw), dora_compose_reference(scaling=0.3, **kw))


def test_shape_errors_name_the_shapes():
    kw = _inputs(4, 6, seed=3)
    with pytest.raises(ValueError, match=r"g \(5,\) must be \[out\]"):
        dora_compose_reference(kw["result"], kw["lora"], torch.ones(5), 1.0)
    with pytest.raises(ValueError, match="must all be"):
        dora_compose_reference(kw["result"], kw["lora"][:, :5], kw["g"], 1.0)


# Every N and out is smaller than one block or crosses a block edge (the interpreter tile: BLOCK_N 32, BLOCK_O 128).
SHAPES = [(1, 1), (1, 257), (7, 33), (130, 1), (130, 33), (130, 257), (64, 128)]


@pytest.mark.parametrize("bias,base", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("n,out", SHAPES)
def test_triton_matches_reference(n, out, bias, base):
    pytest.importorskip("triton")
    kw = _inputs(n, out, seed=n * out, bias=bias, base=base)
    y = dora_compose_triton(scaling=0.25, **kw)
    assert y.dtype == torch.float32 and y.shape == (n, out)
    assert _rel(y, dora_compose_reference(scaling=0.25, **kw)) < FP32_REL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs(dtype):
    pytest.importorskip("triton")
    kw = _inputs(130, 257, seed=5, dtype=dtype)
    y = dora_compose_triton(scaling=0.5, **kw)
    assert y.dtype == dtype
    assert _within_one_step(y, _peft_formula(scaling=0.5, **kw))
    assert _rel(y, _peft_formula(scaling=0.5, **kw)) < 8e-3  # measured 3.3e-3 bf16 (truncating), 2.1e-4 fp16


def test_triton_float64():
    pytest.importorskip("triton")
    kw = _inputs(130, 33, seed=5, dtype=torch.float64, base=True)
    y = dora_compose_triton(scaling=0.5, **kw)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _peft_formula(scaling=0.5, **kw), rtol=1e-13, atol=1e-13)


def test_triton_mixed_dtypes_as_in_training():
    # A bf16 base gives a bf16 result and bias; the fp32 adapter gives fp32 lora and g.
    pytest.importorskip("triton")
    kw = _inputs(33, 70, seed=6)
    kw["result"], kw["bias"] = kw["result"].bfloat16(), kw["bias"].bfloat16()
    y = dora_compose_triton(scaling=0.5, **kw)
    assert y.dtype == torch.bfloat16 and dora_compose_reference(scaling=0.5, **kw).dtype == torch.bfloat16
    assert _within_one_step(y, _peft_formula(scaling=0.5, **kw))


def test_triton_three_dim_and_non_contiguous():
    pytest.importorskip("triton")
    kw = _inputs(14, 40, seed=7, base=True)
    kw["result"] = kw["result"].T.contiguous().T  # [14, 40], column-major
    kw = {k: (v.reshape(2, 7, 40) if v is not None and v.dim() == 2 else v) for k, v in kw.items()}
    y = dora_compose_triton(scaling=1.5, **kw)
    assert y.shape == (2, 7, 40)
    assert _rel(y, dora_compose_reference(scaling=1.5, **kw)) < FP32_REL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias,base", [(False, False), (True, False), (False, True)])
def test_autograd_matches_reference_gradients(path, bias, base):
    """Gradients of the op for every input equal autograd through the torch reference (fp64, 1e-12)."""
    kw = _inputs(7, 33, seed=8, dtype=torch.float64, bias=bias, base=base)
    leaves = {k: v.requires_grad_() for k, v in kw.items() if v is not None}
    grad_y = torch.randn(7, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with path():
        got = torch.autograd.grad(dora_compose(scaling=0.75, **kw), list(leaves.values()), grad_y)
    expected = torch.autograd.grad(dora_compose_reference(scaling=0.75, **kw), list(leaves.values()), grad_y)
    for name, a, b in zip(leaves, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert got[list(leaves).index("g")].abs().sum() > 0  # the magnitude path carries a gradient


def test_autograd_gradcheck():
    kw = _inputs(3, 5, seed=10, dtype=torch.float64, bias=True)
    args = [kw[k].requires_grad_() for k in ("result", "lora", "g")]
    bias = kw["bias"].requires_grad_()
    assert torch.autograd.gradcheck(lambda r, l, g, b: dora_compose(r, l, g, 0.5, bias=b), (*args, bias))


def test_bf16_gradients_in_input_dtypes():
    kw = _inputs(6, 9, seed=11)
    result = kw["result"].bfloat16().requires_grad_()
    lora, g = kw["lora"].requires_grad_(), kw["g"].requires_grad_()
    dora_compose(result, lora, g, 0.5, bias=kw["bias"].bfloat16()).float().sum().backward()
    assert (result.grad.dtype, lora.grad.dtype, g.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    torch.testing.assert_close(lora.grad, (g * 0.5).detach().expand(6, 9))  # ∂y/∂lora = g·s


class _Spy:
    """Counts the op's calls into dora_compose_triton (monkeypatched on the module)."""

    def __init__(self, monkeypatch):
        self.calls, real = 0, dc.dora_compose_triton

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(dc, "dora_compose_triton", spy)


def test_op_dispatch_on_cpu(monkeypatch):
    """Reference outside interpret_on_cpu(), the interpreted kernel inside it."""
    pytest.importorskip("triton")
    spy = _Spy(monkeypatch)
    kw = _inputs(5, 9, seed=12)
    dora_compose(scaling=0.5, **kw)
    assert spy.calls == 0
    with interpret_on_cpu():
        y = dora_compose(scaling=0.5, **kw)
    assert spy.calls == 1 and _rel(y, dora_compose_reference(scaling=0.5, **kw)) < FP32_REL


@pytest.mark.parametrize("tile", dc._TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_every_autotune_tile_matches_reference(tile):
    # The interpreter autotunes over the first tile only, so each one is launched by hand here.
    pytest.importorskip("triton")
    kw = _inputs(65, 257, seed=13)  # crosses every BLOCK_N and BLOCK_O
    y = dora_compose_triton(scaling=0.5, **kw, tile=tile[:2])
    assert _rel(y, dora_compose_reference(scaling=0.5, **kw)) < FP32_REL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,out,bias,base", [(1, 1, False, False), (130, 33, True, False), (7, 257, False, True)])
def test_op_matches_reference(path, dtype, n, out, bias, base):
    # fp32: FP32_REL of the reference; bf16: every element within one bf16 step of the fp64 formula.
    kw = _inputs(n, out, seed=n + out, dtype=dtype, bias=bias, base=base)
    with path():
        y = dora_compose(scaling=0.5, **kw)
    assert y.dtype == dtype and y.shape == (n, out) and y.is_contiguous()
    if dtype == torch.float32:
        assert _rel(y, dora_compose_reference(scaling=0.5, **kw)) < FP32_REL
    else:
        assert _within_one_step(y, _peft_formula(scaling=0.5, **kw))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias,base", [(False, False), (True, False), (False, True), (True, True)])
def test_opcheck(path, bias, base):
    """Schema, autograd registration, fake kernel and AOT dispatch (dynamic shapes) of the op."""
    kw = _inputs(6, 10, seed=14, dtype=torch.float64, bias=bias, base=base)
    args = (kw["result"], kw["lora"], kw["g"], 0.5, kw["bias"], kw["base"])
    grads = tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
    with path():
        for a in (args, grads):
            torch.library.opcheck(torch.ops.subspace.dora_compose.default, a)


def test_op_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces through the op (fake kernel, AOT autograd) with no graph break.

    aot_eager: Inductor's C++ build takes ~30 s on CPU, the rest of the stack is what is checked.
    """
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    kw = _inputs(6, 9, seed=15, bias=True)
    result, lora, g = (kw[k].requires_grad_() for k in ("result", "lora", "g"))
    torch._dynamo.reset()
    fn = torch.compile(lambda r, l, g: dora_compose(r, l, g, 0.5, bias=kw["bias"]).relu(), fullgraph=True,
                       backend="aot_eager")
    start = time.perf_counter()
    y = fn(result, lora, g)
    grads = torch.autograd.grad(y.sum(), (result, lora, g))
    assert time.perf_counter() - start < 10
    expected = dora_compose_reference(result, lora, g, 0.5, bias=kw["bias"]).relu()
    torch.testing.assert_close(y, expected)
    for a, b in zip(grads, torch.autograd.grad(expected.sum(), (result, lora, g))):
        torch.testing.assert_close(a, b)
