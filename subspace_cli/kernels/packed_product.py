"""The packed product of a sparse dictionary layer: y = z·Sᵀ with S stored packed.

A CoSpaDi layer (Sparse Dictionary Learning, arXiv 2509.22075) stores W [out, in] ~= S·D with a
dense dictionary D [k, in] and a coefficient matrix S [out, k] holding exactly s nonzeros per
row, packed as `values` [out, s] and `indices` [out, s] (atom ids in [0, k), each row sorted
ascending, no duplicates). After z = x·Dᵀ [N, k], the layer needs

    y[n, o] = Σ_j values[o, j] · z[n, indices[o, j]]        y: [N, out]

`packed_product_reference` scatters the code into a dense S and runs one GEMM: simple and fast
on CPU, but it rebuilds an [out, k] matrix per call. `packed_product_triton` gathers straight
from the packed code, reading s instead of k coefficients per output. Triton is an optional
extra: it is imported only when the Triton path is asked for, so this module imports without it.
"""

from __future__ import annotations

import functools

import torch

from subspace_cli.kernels.triton_support import cdiv, interpreting, triton_available


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    if values.dim() != 2 or tuple(indices.shape) != tuple(values.shape):
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [out, s]")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if z.dim() < 1:
        raise ValueError("z must be [..., k]")


def packed_product_reference(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = z·Sᵀ, S [out, k] scattered from the packed code; z [..., k] -> y [..., out] in z's dtype.

    Accumulates in float32 (float64 for float64 inputs). The only transient is the dense S
    [out, k] (no [N, out, s] gather), so memory does not grow with N beyond z and y themselves.
    Duplicate ids in a row are summed, as the gather kernel would.
    """
    _check(z, values, indices)
    k = z.shape[-1]
    acc = _acc_dtype(z.dtype)
    dense = torch.zeros(values.shape[0], k, dtype=acc, device=z.device)
    dense.scatter_add_(1, indices.to(device=z.device, dtype=torch.int64), values.to(device=z.device, dtype=acc))
    y = z.reshape(-1, k).to(acc) @ dense.T
    return y.to(z.dtype).reshape(*z.shape[:-1], values.shape[0])


@functools.cache
def _triton_kernel():
    """Define the Triton kernel on first use (TRITON_INTERPRET is read when it is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def packed_product_kernel(z_ptr, val_ptr, idx_ptr, y_ptr, N, K, OUT, S,
                              BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, FP64: tl.constexpr):
        # One program: rows [BLOCK_N] x outputs [BLOCK_O] of y. z is [N, K], values/indices [OUT, S],
        # y [N, OUT], all row-major. Each step j gathers one atom column per output from z.
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_n = offs_n < N
        mask_o = offs_o < OUT
        mask = mask_n[:, None] & mask_o[None, :]
        z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * K  # [BLOCK_N, 1] row starts
        code = offs_o.to(tl.int64) * S  # [BLOCK_O] offsets of each output's packed code
        acc_type = tl.float64 if FP64 else tl.float32
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=acc_type)
        for j in range(S):
            # Cast after every load: bf16/fp16 arithmetic is wrong in the CPU interpreter.
            atom = tl.load(idx_ptr + code + j, mask=mask_o, other=0).to(tl.int32)  # [BLOCK_O]
            v = tl.load(val_ptr + code + j, mask=mask_o, other=0).to(acc_type)  # [BLOCK_O]
            zg = tl.load(z_rows + atom[None, :], mask=mask, other=0).to(acc_type)  # [BLOCK_N, BLOCK_O]
            acc += zg * v[None, :]
        y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * OUT + offs_o[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    return packed_product_kernel


def packed_product_triton(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Triton gather-accumulate version of `packed_product_reference`; same shapes and dtypes.

    z [..., k] in float32/float16/bfloat16/float64, values [out, s] (cast to z's dtype), indices
    [out, s] int16/int32/int64. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    Ids are not range-checked (that would cost a device sync): out-of-range ids read out of bounds.
    No autograd: inference only.
    """
    _check(z, values, indices)
    kernel = _triton_kernel()
    if not z.is_cuda and not interpreting(kernel):
        raise RuntimeError("packed_product_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        indices = indices.to(torch.int32)
    k, (out, s) = z.shape[-1], values.shape
    z2 = z.reshape(-1, k).contiguous()
    values = values.to(device=z.device, dtype=z.dtype).contiguous()
    indices = indices.to(device=z.device).contiguous()
    n = z2.shape[0]
    y = torch.empty(n, out, dtype=z.dtype, device=z.device)
    if n and out:
        block_n = 16 if n <= 16 else 32 if n <= 256 else 64
        block_o = 64
        grid = (cdiv(n, block_n), cdiv(out, block_o))
        kernel[grid](z2, values, indices, y, n, k, out, s,
                     BLOCK_N=block_n, BLOCK_O=block_o, FP64=z.dtype == torch.float64)
    return y.reshape(*z.shape[:-1], out)


def packed_product(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors when triton imports, else the torch reference."""
    if z.is_cuda and triton_available():
        return packed_product_triton(z, values, indices)
    return packed_product_reference(z, values, indices)


def enable_dictionary_kernel() -> bool:
    """Make every DictionaryLinear use the Triton kernel on CUDA; False (and no change) without CUDA or triton."""
    if not (torch.cuda.is_available() and triton_available()):
        return False
    from subspace_cli.modules.remote_modeling import DictionaryLinear

    # A staticmethod, so that `self.kernel(z, values, indices)` does not pass the module as z.
    DictionaryLinear.kernel = staticmethod(packed_product_triton)
    return True
