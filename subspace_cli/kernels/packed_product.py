"""The packed product of a sparse dictionary layer, y = z·Sᵀ with S stored packed, as an op.

A CoSpaDi layer (Sparse Dictionary Learning, arXiv 2509.22075) stores W [out, in] ~= S·D with a
dense dictionary D [k, in] and a coefficient matrix S [out, k] holding exactly s nonzeros per
row, packed as `values` [out, s] and `indices` [out, s] (atom ids in [0, k), each row sorted
ascending, no duplicates). After z = x·Dᵀ [N, k], the layer needs

    y[n, o] = Σ_j values[o, j] · z[n, indices[o, j]]        y: [N, out]

`packed_product_reference` scatters the code into a dense S and runs one GEMM: simple and fast
on CPU, but it rebuilds an [out, k] matrix per call. `packed_product_triton` gathers straight
from the packed code, reading s instead of k coefficients per output (autotuned tiles).

`subspace::packed_product(Tensor z, Tensor values, Tensor indices) -> Tensor` is the op: a
`torch.library.triton_op` when triton imports (a plain `custom_op` otherwise), with a fake
kernel for torch.compile and a backward for z and values. `packed_product` calls it; the
dispatch rule is in `triton_support`. `use_packed_product(module)` opts one DictionaryLinear in.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from subspace_cli.kernels.triton_support import (autotune_configs, cdiv, define_op, interpreting, n_bucket,
                                                 triton_available, use_triton)

OP_NAME = "subspace::packed_product"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    if values.dim() != 2 or tuple(indices.shape) != tuple(values.shape):
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [out, s]")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if z.dim() < 1:
        raise ValueError("z must be [..., k]")


def _dense(values: torch.Tensor, indices: torch.Tensor, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """S [out, k] in `dtype`, scattered from the packed code (duplicate ids summed)."""
    dense = torch.zeros(values.shape[0], k, dtype=dtype, device=device)
    return dense.scatter_add_(1, indices.to(device=device, dtype=torch.int64), values.to(device=device, dtype=dtype))


def packed_product_reference(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = z·Sᵀ, S [out, k] scattered from the packed code; z [..., k] -> y [..., out] in z's dtype.

    Accumulates in float32 (float64 for float64 inputs). The only transient is the dense S
    [out, k] (no [N, out, s] gather), so memory does not grow with N beyond z and y themselves.
    Duplicate ids in a row are summed, as the gather kernel would. Differentiable (the test oracle).
    """
    _check(z, values, indices)
    k = z.shape[-1]
    acc = _acc_dtype(z.dtype)
    y = z.reshape(-1, k).to(acc) @ _dense(values, indices, k, acc, z.device).T
    return y.to(z.dtype).reshape(*z.shape[:-1], values.shape[0])


# (BLOCK_N, BLOCK_O, num_warps): a thin tile for decode-sized N (more programs on a small out)
# and taller ones for prefill. The first is the interpreter's (few programs: it runs each in Python).
_TILES = [(32, 64, 4), (16, 32, 2), (64, 64, 4), (64, 128, 8)]


def _define_kernel():
    """The autotuned Triton kernel (TRITON_INTERPRET is read here, at import)."""
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_O": bo}, num_warps=w) for bn, bo, w in _TILES]

    @triton.autotune(configs=autotune_configs(configs), key=["N_BUCKET", "OUT", "S"])
    @triton.jit
    def packed_product_kernel(z_ptr, val_ptr, idx_ptr, y_ptr, N, K, OUT, S, N_BUCKET,
                              FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
        # One program: rows [BLOCK_N] x outputs [BLOCK_O] of y. z is [N, K], values/indices [OUT, S],
        # y [N, OUT], all row-major. Each step j gathers one atom column per output from z.
        # N_BUCKET only keys the autotuner.
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


packed_product_kernel = _define_kernel() if triton_available() else None


def packed_product_triton(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Triton gather-accumulate version of `packed_product_reference`; same shapes and dtypes.

    z [..., k] in float32/float16/bfloat16/float64, values [out, s] (cast to z's dtype), indices
    [out, s] int16/int32/int64. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    Ids are not range-checked (that would cost a device sync): out-of-range ids read out of bounds.
    No autograd (the op adds it). `tile` = (BLOCK_N, BLOCK_O) skips the autotuner (tests).
    """
    _check(z, values, indices)
    kernel = packed_product_kernel
    if kernel is None:
        raise RuntimeError("packed_product_triton needs triton")
    if not z.is_cuda and not interpreting(kernel):
        raise RuntimeError("packed_product_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        indices = indices.to(torch.int32)
    k, (out, s) = z.shape[-1], values.shape
    z2 = z.reshape(-1, k).contiguous()  # [N, k]
    values = values.to(device=z.device, dtype=z.dtype).contiguous()
    indices = indices.to(device=z.device).contiguous()
    n = z2.shape[0]
    y = torch.empty(n, out, dtype=z.dtype, device=z.device)
    if n and out:
        args = (z2, values, indices, y, n, k, out, s, n_bucket(n))
        if tile is None:
            grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(out, meta["BLOCK_O"]))
            wrap_triton(packed_product_kernel)[grid](*args, FP64=z.dtype == torch.float64)
        else:
            kernel.fn[(cdiv(n, tile[0]), cdiv(out, tile[1]))](*args, FP64=z.dtype == torch.float64,
                                                              BLOCK_N=tile[0], BLOCK_O=tile[1])
    return y.reshape(*z.shape[:-1], out)


# --- the op --------------------------------------------------------------------------------------

def _packed_product_impl(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The op's body: the Triton kernel where `use_triton` says so, else the torch reference."""
    if use_triton(z, packed_product_kernel):
        return packed_product_triton(z, values, indices)
    return packed_product_reference(z, values, indices).contiguous()


_op = define_op(OP_NAME, _packed_product_impl)


@_op.register_fake
def _packed_product_fake(z, values, indices):
    """Shapes and dtype only: y [..., out] in z's dtype, contiguous, on z's device."""
    _check(z, values, indices)
    return z.new_empty((*z.shape[:-1], values.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # z [..., k], values [out, s], indices [out, s]


def _backward(ctx, grad_y):
    """dz = dy·S [..., k]; dvalues[o, j] = (dyᵀ·z)[o, indices[o, j]] [out, s]; no gradient for indices.

    Plain torch (traceable), accumulated like the forward: each side costs one GEMM the size of
    the reference's and one transient [out, k].
    """
    z, values, indices = ctx.saved_tensors
    k, out = z.shape[-1], values.shape[0]
    acc = _acc_dtype(z.dtype)
    dy = grad_y.reshape(-1, out).to(acc)  # [N, out]
    d_z = d_values = None
    if ctx.needs_input_grad[0]:
        d_z = (dy @ _dense(values, indices, k, acc, z.device)).to(z.dtype).reshape(z.shape)
    if ctx.needs_input_grad[1]:
        dyz = dy.T @ z.reshape(-1, k).to(acc)  # [out, k]
        d_values = dyz.gather(1, indices.to(device=z.device, dtype=torch.int64))
        d_values = d_values.to(device=values.device, dtype=values.dtype)
    return d_z, d_values, None


_op.register_autograd(_backward, setup_context=_setup_context)


def packed_product(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = z·Sᵀ through `subspace::packed_product`: Triton on CUDA when triton imports, else the reference."""
    return torch.ops.subspace.packed_product(z, values, indices)


def use_packed_product(module) -> bool:
    """Route one module's packed product through the op, when its Triton kernel applies.

    Duck-typed (this package's kernels never import its modules): `module` is anything with a
    `product(z, values, indices)` attribute and a `values` tensor, i.e. a DictionaryLinear. It
    switches when the kernel would run on `values` (on CUDA with triton; on CPU only inside
    `interpret_on_cpu()`); other instances are left as they are. Returns whether it switched.
    """
    if not callable(getattr(module, "product", None)):
        raise TypeError(f"{type(module).__name__} has no `product` to replace")
    values = getattr(module, "values", None)
    if not isinstance(values, torch.Tensor) or not use_triton(values, packed_product_kernel):
        return False
    module.product = packed_product
    return True
