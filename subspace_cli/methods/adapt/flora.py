"""FLoRA: a Tucker-factored update with a trainable low-rank core for N-d weights.

Si et al. 2024, "FLoRA: Low-Rank Core Space for N-dimension", arXiv 2405.14739 (official code:
github.com/SJTU-DeepVisionLab/FLoRA, flora/layers.py). The update of an N-d weight is a Tucker product

    ΔW = s · G ×₀ U_out ×₁ U_in ×₂ U_k₁ ×₃ …       G [r_out, r_in, r_k₁, …], U_n [dim_n, r_n]

Linear W [out, in]: ΔW = s·U_out·G·U_inᵀ. ConvNd W [out, in, k₁, …]: one factor per kernel mode, so the
update keeps the kernel's spatial structure instead of flattening it (the paper's point against LoRA).
Mode ranks: r_out = min(rank, out), r_in = min(rank, in), r_k = min(kernel_rank or rank, k) (the
official conv example uses kernel rank 2 with rank 16: `-O kernel_rank=2`).

Init: G = 0 (ΔW = 0, the model starts as the base; at step 1 only G gets gradients, as LoRA's A when
B = 0), as the official code. Factors: `orthonormal` (default) draws random orthonormal columns, so a
step on G moves ΔW by the same amount whatever the layer width and one learning rate fits every model;
`kaiming` is the official code's kaiming_normal_(a=√3) on [dim, r], i.e. N(0, 1/(2r)) entries, whose
update size grows with width. Scaling s = alpha / rank, as LoRA (the official code's free `scale`,
default 1, which is ours with the default alpha = rank).

Export, exact, unfolding along the output mode: ΔW_(0) = U_out · [G ×₁ U_in ×₂ U_k₁ …]_(0), so
A = G ×₁ U_in ×₂ U_k₁ … as [r_out, in, k₁, …] (PEFT's lora_A conv with the base's kernel, stride,
padding) and B = s·U_out as [out, r_out, 1, …] (PEFT's 1×…×1 lora_B conv).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.methods.adapt.base import AdapterLayer, AdapterMethod, LoraDelta, layerwise
from subspace_cli.methods.registry import MethodConfig, Needs, register
from subspace_cli.walk import is_conv1d

# Adam moves each core entry by ~lr per step, so with orthonormal factors ΔW moves by ~lr·r (Frobenius);
# a LoRA step (Kaiming A, s = 1) moves it by ~0.58·lr·√(out·r). 2e-3 matches LoRA's 2e-4 for out/r ≈ 100-1000;
# on the tiny llama (rank 2, 12 steps) held-out perplexity falls 127.20 -> 127.09 (LoRA at 2e-4: 127.06).
DEFAULT_LR = 2e-3

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FloraConfig(MethodConfig):
    kernel_rank: int | None = Field(
        None, ge=1, description="Tucker rank of each conv kernel mode, capped at the kernel size; none: --rank")
    init: Literal["orthonormal", "kaiming"] = Field(
        "orthonormal", description="factor init (core is zero): orthonormal columns, or the official code's "
                                   "kaiming_normal (N(0, 1/2r), update size grows with layer width)")


def _mode_product(t: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """t ×_mode u: t [..., r, ...] (r at `mode`), u [dim, r] -> [..., dim, ...]."""
    return torch.movedim(torch.tensordot(t, u, dims=([mode], [1])), -1, mode)


def _factor(dim: int, r: int, init: str, generator: torch.Generator) -> torch.Tensor:
    g = torch.randn(dim, r, generator=generator)  # drawn on CPU: the same seed gives the same init anywhere
    if init == "kaiming":
        return g / math.sqrt(2 * r)  # kaiming_normal_(a=√3): gain √(2/(1+3)), fan_in = r
    q, tri = torch.linalg.qr(g)  # [dim, r], r ≤ dim
    return q * torch.where(torch.diagonal(tri) < 0, -1.0, 1.0)  # fix QR's sign freedom: a unique factor


def _check_supported(base: nn.Module) -> None:
    if isinstance(base, nn.Linear) or is_conv1d(base):
        return
    if not isinstance(base, _CONVS):
        raise UsageError(f"flora adapts Linear, transformers Conv1D and Conv1d/Conv2d/Conv3d layers, not "
                         f"{type(base).__name__}; --exclude that layer")
    # The export must load as PEFT LoRA conv layers, whose lora_A takes kernel, stride and padding only.
    if base.groups != 1:
        raise UsageError(f"flora supports {type(base).__name__} with groups=1 only, not groups={base.groups}; "
                         "--exclude that layer")
    if any(d != 1 for d in base.dilation):
        raise UsageError(f"flora supports {type(base).__name__} with dilation 1 only, not {tuple(base.dilation)} "
                         "(PEFT's LoRA conv ignores dilation, so the adapter would not load exactly); --exclude it")
    if base.padding_mode != "zeros":
        raise UsageError(f"flora supports {type(base).__name__} with padding_mode='zeros' only, not "
                         f"'{base.padding_mode}' (PEFT's LoRA conv pads with zeros); --exclude that layer")


class FloraLayer(AdapterLayer):
    """A frozen Linear / Conv1D / ConvNd plus s · Tucker(core, factors)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, config: FloraConfig,
                 generator: torch.Generator) -> None:
        _check_supported(base)
        super().__init__(base)
        self.is_conv = isinstance(base, _CONVS)
        if self.is_conv:
            dims = [base.out_channels, base.in_channels, *base.kernel_size]
        else:
            out_f, in_f = base.weight.shape[::-1] if is_conv1d(base) else base.weight.shape  # Conv1D stores [in, out]
            dims = [out_f, in_f]
        kernel_rank = config.kernel_rank or rank
        ranks = [min(rank, d) for d in dims[:2]] + [min(kernel_rank, k) for k in dims[2:]]
        device = base.weight.device
        self.scaling = alpha / rank
        self.core = nn.Parameter(torch.zeros(ranks, device=device))  # [r_out, r_in, r_k₁, …]
        # factors[0] U_out [out, r_out], factors[1] U_in [in, r_in], factors[2:] U_k [k, r_k]
        self.factors = nn.ParameterList(
            [nn.Parameter(_factor(d, r, config.init, generator).to(device)) for d, r in zip(dims, ranks)])

    def _inner(self) -> torch.Tensor:
        """G ×₁ U_in ×₂ U_k₁ …: [r_out, in, k₁, …], the export's A."""
        t = self.core
        for mode in range(1, self.core.dim()):
            t = _mode_product(t, self.factors[mode], mode)
        return t

    def delta(self) -> torch.Tensor:
        """Dense ΔW in [out, in, k₁, …] (float32, differentiable); for conv forward and checks."""
        return self.scaling * _mode_product(self._inner(), self.factors[0], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            # One conv with W + ΔW (kernel-sized ΔW) costs less than the base conv plus an adapter conv.
            weight = self.base.weight + self.delta().to(self.base.weight.dtype)
            return self.base._conv_forward(x, weight, self.base.bias)
        # Factored path, never a dense ΔW: x [..., in] -> [..., r_in] -> [..., r_out] -> [..., out].
        u_out, u_in = self.factors[0], self.factors[1]
        h = x.to(u_in.dtype) @ u_in @ self.core.t() @ u_out.t()
        out = self.base(x)
        return out + (self.scaling * h).to(out.dtype)

    @torch.no_grad()
    def lora_delta(self) -> LoraDelta:
        a = self._inner().float().clone()  # [r_out, in] or [r_out, in, k₁, …]
        b = self.scaling * self.factors[0].float()  # [out, r_out]
        if self.is_conv:
            b = b.reshape(*b.shape, *(1,) * (a.dim() - 2))  # [out, r_out, 1, …, 1]
        return LoraDelta(a, b)


register(AdapterMethod(
    name="flora", config_class=FloraConfig, attach=layerwise(FloraLayer),
    paper="Si et al. 2024, arXiv 2405.14739",
    summary="Tucker update s·G ×ₙ Uₙ with a trainable core and one factor per mode (Linear and ConvNd kernels), "
            "core zero at start",
    needs={Needs.TRAINING_DATA}, default_lr=DEFAULT_LR))
