"""The packed product y = z·Sᵀ of a sparse dictionary layer: torch reference, Triton kernel, op.

The Triton kernel runs in the CPU interpreter here (conftest sets TRITON_INTERPRET=1); the op
takes it on CPU tensors only inside `interpret_on_cpu()`.
"""

import ast
import contextlib
import time
from pathlib import Path

import pytest
import torch

from subspace_cli.kernels import packed_product as pp
from subspace_cli.kernels.packed_product import (
    packed_product,
    packed_product_reference,
    packed_product_triton,
    use_packed_product,
)
from subspace_cli.kernels.triton_support import interpret_on_cpu

FP32_REL = 1e-4  # ‖Δ‖/‖ref‖ allowed in fp32; measured ~1e-7 (same products, another summation order)


def _code(out, k, s, seed, index_dtype=torch.int64, dtype=torch.float32):
    """values [out, s], sorted unique atom ids [out, s] in [0, k)."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(out, k, generator=g).argsort(1)[:, :s].sort(1).values.to(index_dtype)
    return torch.randn(out, s, generator=g, dtype=dtype), indices


def _dense(values, indices, k):
    """S [out, k] in float64, built one entry per (row, slot) without scatter."""
    rows = torch.arange(values.shape[0]).unsqueeze(1).expand_as(indices)
    dense = torch.zeros(values.shape[0], k, dtype=torch.float64)
    dense[rows.reshape(-1), indices.long().reshape(-1)] = values.double().reshape(-1)
    return dense


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("n,k,out,s", [(5, 33, 7, 1), (64, 130, 100, 17), (3, 5, 100, 5)])
def test_reference_matches_dense(n, k, out, s, index_dtype):
    values, indices = _code(out, k, s, seed=n + k, index_dtype=index_dtype)
    z = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    y = packed_product_reference(z, values, indices)
    assert y.dtype == torch.float32 and y.shape == (n, out)
    assert _rel(y, z.double() @ _dense(values, indices, k).T) < FP32_REL


def test_reference_float64_and_leading_dims():
    values, indices = _code(9, 20, 6, seed=3, dtype=torch.float64)
    z = torch.randn(2, 4, 20, dtype=torch.float64)
    y = packed_product_reference(z, values, indices)
    assert y.shape == (2, 4, 9) and y.dtype == torch.float64
    torch.testing.assert_close(y, z @ _dense(values, indices, 20).T, rtol=1e-12, atol=1e-12)


def test_dispatcher_uses_reference_on_cpu():
    values, indices = _code(7, 12, 3, seed=4)
    z = torch.randn(4, 12)
    assert torch.equal(packed_product(z, values, indices), packed_product_reference(z, values, indices))


# Triton (interpreter) against the reference: every N and out below crosses a block edge or is
# smaller than one block (the interpreter's tile is BLOCK_N 32, BLOCK_O 64); s runs from 1 to k.
TRITON_CASES = [
    (1, 5, 1, 1), (3, 5, 7, 5), (64, 33, 7, 10), (65, 33, 100, 33),
    (3, 130, 100, 1), (64, 130, 7, 65), (65, 130, 100, 130), (1, 33, 100, 20),
]


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("n,k,out,s", TRITON_CASES)
def test_triton_matches_reference(n, k, out, s, index_dtype):
    pytest.importorskip("triton")
    values, indices = _code(out, k, s, seed=n * k + s, index_dtype=index_dtype)
    z = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    y = packed_product_triton(z, values, indices)
    assert y.dtype == torch.float32 and y.shape == (n, out)
    assert _rel(y, packed_product_reference(z, values, indices)) < FP32_REL


def test_triton_three_dim_input():
    pytest.importorskip("triton")
    values, indices = _code(50, 40, 12, seed=5, index_dtype=torch.int16)
    z = torch.randn(2, 7, 40)
    y = packed_product_triton(z, values, indices)
    assert y.shape == (2, 7, 50)
    assert _rel(y, packed_product_reference(z, values, indices)) < FP32_REL
    assert _rel(y, z.double() @ _dense(values, indices, 40).T) < FP32_REL


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)])
def test_triton_other_dtypes(dtype, tol):
    # Half outputs are rounded once from an fp32 sum, so they agree to about one rounding step.
    pytest.importorskip("triton")
    values, indices = _code(70, 33, 9, seed=6, dtype=dtype)
    z = torch.randn(20, 33, dtype=dtype)
    y = packed_product_triton(z, values, indices)
    assert y.dtype == dtype
    assert _rel(y, z.double() @ _dense(values, indices, 33).T) < tol


def test_triton_non_contiguous_inputs():
    pytest.importorskip("triton")
    values, indices = _code(30, 24, 6, seed=7, index_dtype=torch.int32)
    z = torch.randn(24, 10).T  # [10, 24], not contiguous
    y = packed_product_triton(z, values.T.contiguous().T, indices)
    assert _rel(y, packed_product_reference(z, values, indices)) < FP32_REL


@pytest.mark.parametrize("positions", ["indices", "bitmask"])
def test_dictionary_linear_torch_path_is_the_packed_product(positions):
    from subspace_cli.modules.lowrank import dictionary_from_factors

    values, indices = _code(11, 16, 4, seed=8)
    dictionary, bias, x = torch.randn(16, 9), torch.randn(11), torch.randn(2, 3, 9)
    module = dictionary_from_factors(dictionary, values, indices, bias, positions=positions)
    expected = packed_product_reference(x @ dictionary.T, values, indices) + bias
    with torch.no_grad():
        assert _rel(module(x), expected) < FP32_REL


def _paths():
    """The op's two paths on CPU: the torch reference, and the Triton kernel in the interpreter."""
    yield pytest.param(contextlib.nullcontext, id="reference")
    yield pytest.param(interpret_on_cpu, id="triton", marks=pytest.mark.skipif(
        pp.packed_product_kernel is None, reason="needs triton"))


PATHS = list(_paths())


class _Spy:
    """Counts the op's calls into packed_product_triton (monkeypatched on the module)."""

    def __init__(self, monkeypatch):
        self.calls, real = 0, pp.packed_product_triton

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(pp, "packed_product_triton", spy)


def test_op_dispatch_on_cpu(monkeypatch):
    """Reference outside interpret_on_cpu(), the interpreted kernel inside it."""
    pytest.importorskip("triton")
    spy = _Spy(monkeypatch)
    values, indices = _code(9, 20, 4, seed=11)
    z = torch.randn(5, 20)
    assert torch.equal(packed_product(z, values, indices), packed_product_reference(z, values, indices))
    assert spy.calls == 0
    with interpret_on_cpu():
        y = packed_product(z, values, indices)
    assert spy.calls == 1 and _rel(y, packed_product_reference(z, values, indices)) < FP32_REL


@pytest.mark.parametrize("tile", pp._TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_every_autotune_tile_matches_reference(tile):
    # The interpreter autotunes over the first tile only, so each one is launched by hand here.
    pytest.importorskip("triton")
    values, indices = _code(100, 33, 7, seed=12, index_dtype=torch.int16)
    z = torch.randn(65, 33, generator=torch.Generator().manual_seed(3))  # crosses every BLOCK_N and BLOCK_O
    y = packed_product_triton(z, values, indices, tile=tile[:2])
    assert _rel(y, packed_product_reference(z, values, indices)) < FP32_REL


# Value tolerances of the op against the fp64 product: fp32 as above; bf16 one rounding of an fp32
# sum (2^-8 relative per element, plus the bf16 inputs' own rounding already in both sides).
OP_TOL = {torch.float32: FP32_REL, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k,out,s", [((1, 5), 5, 1, 1), ((65, 33), 33, 100, 7), ((2, 7, 40), 40, 50, 12)])
def test_op_matches_reference(path, dtype, shape, k, out, s):
    values, indices = _code(out, k, s, seed=k + out, index_dtype=torch.int32, dtype=dtype)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    with path():
        y = packed_product(z, values, indices)
    assert y.dtype == dtype and y.shape == (*shape[:-1], out) and y.is_contiguous()
    assert _rel(y, z.double() @ _dense(values, indices, k).T) < OP_TOL[dtype]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,index_dtype", [(torch.float32, torch.int16), (torch.float64, torch.int64)])
def test_opcheck(path, dtype, index_dtype):
    """Schema, autograd registration, fake kernel and AOT dispatch (dynamic shapes) of the op."""
    values, indices = _code(11, 16, 4, seed=13, index_dtype=index_dtype, dtype=dtype)
    z = torch.randn(2, 3, 16, dtype=dtype)
    with path():
        for args in ((z, values, indices), (z.requires_grad_(), values.requires_grad_(), indices)):
            torch.library.opcheck(torch.ops.subspace.packed_product.default, args)


@pytest.mark.parametrize("path", PATHS)
def test_op_gradients_match_reference_autograd(path):
    """dz and dvalues of the op equal autograd through the torch reference (fp64, 1e-12)."""
    values, indices = _code(30, 24, 6, seed=14, dtype=torch.float64)
    z = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    grad_y = torch.randn(2, 5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with path():
        got = torch.autograd.grad(packed_product(z, values, indices), (z, values), grad_y)
    expected = torch.autograd.grad(packed_product_reference(z, values, indices), (z, values), grad_y)
    for name, a, b in zip(("z", "values"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_op_gradcheck_and_input_dtypes():
    values, indices = _code(5, 7, 3, seed=15, dtype=torch.float64)
    z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, v: packed_product(z, v, indices), (z, values.requires_grad_()))
    zb = torch.randn(4, 7).bfloat16().requires_grad_()
    vf = values.detach().float().requires_grad_()
    packed_product(zb, vf, indices).float().sum().backward()
    assert (zb.grad.dtype, vf.grad.dtype) == (torch.bfloat16, torch.float32)


def test_op_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces through the op (fake kernel, AOT autograd) with no graph break.

    aot_eager: Inductor's C++ build takes ~30 s on CPU, the rest of the stack is what is checked.
    """
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    values, indices = _code(12, 10, 3, seed=16)
    z = torch.randn(6, 10, requires_grad=True)
    values.requires_grad_()
    torch._dynamo.reset()
    fn = torch.compile(lambda z, v: torch.tanh(packed_product(z, v, indices)) * 2, fullgraph=True,
                       backend="aot_eager")
    start = time.perf_counter()
    y = fn(z, values)
    y.sum().backward()
    assert time.perf_counter() - start < 10
    expected = torch.tanh(packed_product_reference(z, values, indices)) * 2
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(z.grad, torch.autograd.grad(expected.sum(), z, retain_graph=True)[0])
    torch.testing.assert_close(values.grad, torch.autograd.grad(expected.sum(), values)[0])


def _two_modules(positions="indices"):
    from subspace_cli.modules.lowrank import dictionary_from_factors

    values, indices = _code(11, 16, 4, seed=17)
    make = lambda: dictionary_from_factors(torch.randn(16, 9), values, indices, torch.randn(11),
                                           positions=positions)
    return make(), make()


@pytest.mark.parametrize("positions", ["indices", "bitmask"])
def test_opting_one_module_in_leaves_the_other(monkeypatch, positions):
    pytest.importorskip("triton")
    from subspace_cli.modules.remote_modeling import DictionaryLinear, scatter_product

    spy = _Spy(monkeypatch)
    chosen, other = _two_modules(positions)
    x = torch.randn(2, 3, 9)
    with interpret_on_cpu():
        assert use_packed_product(chosen) is True
        assert chosen.product is packed_product and other.product is scatter_product
        assert not hasattr(DictionaryLinear, "product")  # nothing on the class
        with torch.no_grad():
            y_chosen, y_other = chosen(x), other(x)
    assert spy.calls == 1  # only the opted-in module ran the kernel
    with torch.no_grad():
        for module, y in ((chosen, y_chosen), (other, y_other)):
            z = x @ module.dictionary.T
            assert _rel(y, packed_product_reference(z, module.values, module.atom_indices()) + module.bias) < FP32_REL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_use_packed_product_without_cuda_changes_nothing():
    from subspace_cli.modules.remote_modeling import scatter_product

    module, _ = _two_modules()
    assert use_packed_product(module) is False
    assert module.product is scatter_product


def test_use_packed_product_needs_a_product():
    with pytest.raises(TypeError, match="Linear has no `product`"):
        use_packed_product(torch.nn.Linear(2, 2))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_layering_kernels_never_import_modules():
    """kernels/ sits below modules/; the shipped modeling file imports neither subspace_cli nor triton."""
    package = Path(pp.__file__).parents[1]
    for path in (package / "kernels").glob("*.py"):
        assert not any(name.startswith("subspace_cli.modules") for name in _imports(path)), path.name
    shipped = _imports(package / "modules" / "remote_modeling.py")
    assert not any(name.split(".")[0] in ("subspace_cli", "triton") for name in shipped)
