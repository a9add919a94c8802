"""The packed product y = z·Sᵀ of a sparse dictionary layer: torch reference and Triton kernel.

The Triton kernel runs in the CPU interpreter here (conftest sets TRITON_INTERPRET=1).
"""

import pytest
import torch

from subspace_cli.kernels.packed_product import packed_product, packed_product_reference, packed_product_triton

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
# smaller than one block (BLOCK_N 16/32/64, BLOCK_O 64); s runs from 1 to k.
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
    from subspace_cli.modules.remote_modeling import DictionaryLinear

    values, indices = _code(11, 16, 4, seed=8)
    dictionary, bias, x = torch.randn(16, 9), torch.randn(11), torch.randn(2, 3, 9)
    module = DictionaryLinear.from_factors(dictionary, values, indices, bias, positions=positions)
    expected = packed_product_reference(x @ dictionary.T, values, indices) + bias
    with torch.no_grad():
        assert _rel(module(x), expected) < FP32_REL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_enable_dictionary_kernel_without_cuda_changes_nothing():
    from subspace_cli.kernels.packed_product import enable_dictionary_kernel
    from subspace_cli.modules.remote_modeling import DictionaryLinear

    assert enable_dictionary_kernel() is False
    assert DictionaryLinear.kernel is None
