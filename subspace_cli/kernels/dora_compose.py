"""The compose step of a DoRA layer, fused: one pass over [N, out] instead of five.

DoRA (Liu et al. 2024, arXiv 2402.09353) rescales each output row of W' = W + s·B·A by
g = m / ‖W + s·B·A‖_row. PEFT writes the layer as a correction added to the base output
(peft/tuners/lora/dora.py, `DoraLinearLayer.forward`):

    y = result + (g − 1)·base + (g·lora)·s        result, base, lora: [N, out]; g: [out]

where `result` = base_layer(x) (bias included), `lora` = B·A·x and `base` = W·x without bias. With
no dropout PEFT reuses `result` for `base` (base = result − bias); with dropout it recomputes
base = W·dropout(x). Eager torch runs this as five [N, out] kernels (sub, mul, mul, add, add);
`dora_compose_triton` reads each input once and writes y once. The output has `result`'s dtype,
as PEFT casts back to it; the arithmetic is fp32 (fp64 for fp64 inputs).

`subspace::dora_compose(Tensor result, Tensor lora, Tensor g, float scaling, Tensor? bias,
Tensor? base) -> Tensor` is the op: a `torch.library.triton_op` when triton imports (a plain
`custom_op` otherwise), with a fake kernel for torch.compile and a torch backward (elementwise
plus one column sum for g). `dora_compose` calls it; the dispatch rule is in `triton_support`:
the autotuned Triton forward on CUDA, else the reference.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from subspace_cli.kernels.triton_support import (autotune_configs, cdiv, define_op, interpreting, n_bucket,
                                                 triton_available, use_triton)

OP_NAME = "subspace::dora_compose"


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(result: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None,
           base: torch.Tensor | None) -> None:
    out = result.shape[-1] if result.dim() else 0
    if result.dim() < 1 or lora.shape != result.shape or (base is not None and base.shape != result.shape):
        raise ValueError(f"result {tuple(result.shape)}, lora {tuple(lora.shape)} and base "
                         f"{None if base is None else tuple(base.shape)} must all be [..., out]")
    for name, vec in (("g", g), ("bias", bias)):
        if vec is not None and tuple(vec.shape) != (out,):
            raise ValueError(f"{name} {tuple(vec.shape)} must be [out] = [{out}]")


def _base_of(result: torch.Tensor, bias: torch.Tensor | None, base: torch.Tensor | None, acc: torch.dtype):
    """The bias-free base output: `base` when given, else result − bias (PEFT's no-dropout path)."""
    if base is not None:
        return base.to(acc)
    return result.to(acc) if bias is None else result.to(acc) - bias.to(acc)


def dora_compose_reference(result: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scaling: float,
                           bias: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """y = result + (g − 1)·base + (g·lora)·s in `result`'s dtype; [..., out] inputs, g and bias [out].

    `base` defaults to result − bias. Differentiable through plain torch ops (the test oracle).
    """
    _check(result, lora, g, bias, base)
    acc = _acc_dtype(result, lora, g, bias, base)
    g = g.to(acc)
    y = result.to(acc) + ((g - 1) * _base_of(result, bias, base, acc) + g * lora.to(acc) * scaling)
    return y.to(result.dtype)


# (BLOCK_N, BLOCK_O, num_warps): ~4096 elements a program, wide or square, and a small tile for
# a few rows; the first is the interpreter's.
_TILES = [(32, 128, 4), (16, 256, 4), (64, 64, 4), (8, 128, 2)]


def _define_kernel():
    """The autotuned Triton kernel (TRITON_INTERPRET is read here, at import)."""
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_O": bo}, num_warps=w) for bn, bo, w in _TILES]

    @triton.autotune(configs=autotune_configs(configs), key=["N_BUCKET", "OUT"])
    @triton.jit
    def dora_compose_kernel(res_ptr, lora_ptr, g_ptr, bias_ptr, base_ptr, y_ptr, N, OUT, N_BUCKET, scaling,
                            HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, FP64: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
        # One program: a [BLOCK_N, BLOCK_O] tile of the row-major [N, OUT] tensors; g, bias [OUT].
        # N_BUCKET only keys the autotuner.
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_o = offs_o < OUT
        mask = (offs_n < N)[:, None] & mask_o[None, :]
        idx = offs_n.to(tl.int64)[:, None] * OUT + offs_o[None, :]
        acc_type = tl.float64 if FP64 else tl.float32
        # Cast after every load: bf16/fp16 arithmetic is wrong in the CPU interpreter.
        res = tl.load(res_ptr + idx, mask=mask, other=0).to(acc_type)
        lora = tl.load(lora_ptr + idx, mask=mask, other=0).to(acc_type)
        g = tl.load(g_ptr + offs_o, mask=mask_o, other=0).to(acc_type)[None, :]
        if HAS_BASE:
            base = tl.load(base_ptr + idx, mask=mask, other=0).to(acc_type)
        elif HAS_BIAS:
            base = res - tl.load(bias_ptr + offs_o, mask=mask_o, other=0).to(acc_type)[None, :]
        else:
            base = res
        y = res + ((g - 1) * base + g * lora * scaling)
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)

    return dora_compose_kernel


dora_compose_kernel = _define_kernel() if triton_available() else None


def dora_compose_triton(result: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scaling: float,
                        bias: torch.Tensor | None = None, base: torch.Tensor | None = None,
                        tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Triton version of `dora_compose_reference`; same shapes and dtypes, no autograd (the op adds it).

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Inputs of mixed dtypes
    (bf16 result, fp32 lora and g) are read as they are, without a cast copy. `tile` =
    (BLOCK_N, BLOCK_O) skips the autotuner (tests).
    """
    _check(result, lora, g, bias, base)
    kernel = dora_compose_kernel
    if kernel is None:
        raise RuntimeError("dora_compose_triton needs triton")
    if not result.is_cuda and not interpreting(kernel):
        raise RuntimeError("dora_compose_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    out = result.shape[-1]
    res2 = result.reshape(-1, out).contiguous()  # [N, out]
    lora2 = lora.reshape(-1, out).contiguous()
    base2 = base.reshape(-1, out).contiguous() if base is not None else res2  # a dummy pointer when absent
    n = res2.shape[0]
    y = torch.empty_like(res2)
    if n and out:
        g = g.contiguous()
        args = (res2, lora2, g, bias.contiguous() if bias is not None else g, base2, y, n, out, n_bucket(n),
                float(scaling))
        flags = {"HAS_BIAS": bias is not None, "HAS_BASE": base is not None,
                 "FP64": _acc_dtype(result, lora, g, bias, base) == torch.float64}
        if tile is None:
            grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(out, meta["BLOCK_O"]))
            wrap_triton(dora_compose_kernel)[grid](*args, **flags)
        else:
            kernel.fn[(cdiv(n, tile[0]), cdiv(out, tile[1]))](*args, **flags, BLOCK_N=tile[0], BLOCK_O=tile[1])
    return y.reshape(result.shape)


# --- the op --------------------------------------------------------------------------------------

def _dora_compose_impl(result: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scaling: float,
                       bias: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
    """The op's body: the Triton kernel where `use_triton` says so, else the torch reference."""
    if use_triton(result, dora_compose_kernel):
        return dora_compose_triton(result, lora, g, scaling, bias, base)
    return dora_compose_reference(result, lora, g, scaling, bias, base).contiguous()


_op = define_op(OP_NAME, _dora_compose_impl)


@_op.register_fake
def _dora_compose_fake(result, lora, g, scaling, bias, base):
    """Shapes and dtype only: y like `result` (contiguous)."""
    _check(result, lora, g, bias, base)
    return result.new_empty(result.shape)


def _setup_context(ctx, inputs, output):
    result, lora, g, scaling, bias, base = inputs
    ctx.scaling, ctx.has_base, ctx.result_dtype = scaling, base is not None, result.dtype
    ctx.save_for_backward(result if base is None else base, lora, g, bias)


def _backward(ctx, grad_y):
    """Gradients for result, lora, g, bias (when base is derived from it) and base; none for scaling."""
    saved, lora, g, bias = ctx.saved_tensors
    s, acc = ctx.scaling, _acc_dtype(grad_y, saved, lora, g)
    grad, g_acc = grad_y.to(acc), g.to(acc)
    need = ctx.needs_input_grad
    # With base derived from result, y = g·result − (g − 1)·bias + (g·lora)·s, so ∂y/∂result = g.
    d_result = (grad if ctx.has_base else grad * g_acc) if need[0] else None
    d_lora = grad * g_acc * s if need[1] else None
    d_g = None
    if need[2]:  # ∂y/∂g = base + lora·s, summed over the rows: [out]
        base = _base_of(saved, None if ctx.has_base else bias, saved if ctx.has_base else None, acc)
        d_g = (grad * (base + lora.to(acc) * s)).reshape(-1, g.shape[0]).sum(0)
    d_bias = None
    if bias is not None and need[4] and not ctx.has_base:
        d_bias = -(grad.reshape(-1, g.shape[0]).sum(0) * (g_acc - 1))
    d_base = grad * (g_acc - 1) if ctx.has_base and need[5] else None
    cast = lambda t, dtype: None if t is None else t.to(dtype)
    return (cast(d_result, ctx.result_dtype), cast(d_lora, lora.dtype), cast(d_g, g.dtype), None,
            cast(d_bias, bias.dtype if bias is not None else None), cast(d_base, saved.dtype))


_op.register_autograd(_backward, setup_context=_setup_context)


def dora_compose(result: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """y through `subspace::dora_compose`, with autograd: Triton on CUDA when triton imports, else the reference."""
    return torch.ops.subspace.dora_compose(result, lora, g, float(scaling), bias, base)
