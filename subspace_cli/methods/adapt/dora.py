"""`dora`: DoRA with a factored row norm, so the layer never forms B·A [out, in].

DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5) trains a LoRA pair and a magnitude m [out]:

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row          W [out, in], A [r, in], B [out, r], s = alpha / r

PEFT gets the row norm by materialising B·A (an identity [in, in] pushed through the adapter).
Scaling DoRA (arXiv 2603.22276) expands it instead:

    ‖W + sBA‖²_o = ‖W_o‖² + 2s·Σ_r B[o,r]·(W·Aᵀ)[o,r] + s²·B_o·(A·Aᵀ)·B_oᵀ

from W·Aᵀ [out, r] and the Gram A·Aᵀ [r, r]; ‖W‖²_row is cached, W being frozen. The forward is
PEFT's `DoraLinearLayer.forward` term for term (peft/tuners/lora/dora.py), composed by the fused
`dora_compose` kernel:

    y = base(x) + (g − 1)·W·x + (g·B·A·x)·s,        g = m / ‖W + s·B·A‖_row  (the norm detached)

With dropout in training, x is dropped first and W·x recomputed on it, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.kernels.dora_compose import dora_compose
from subspace_cli.methods.adapt.base import (AdapterLayer, AdapterMethod, DoraExport, LoraDelta, kaiming_lora_A,
                                             layerwise)
from subspace_cli.methods.adapt.lora_family import DEFAULT_LR, LoraConfig
from subspace_cli.methods.registry import Needs, register
from subspace_cli.walk import is_linear_like, weight_matrix

_BLOCK = 1 << 22  # elements of one fp32 row block of a low-precision W (16 MB transient)


def _acc(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _row_blocks(weight: torch.Tensor, acc: torch.dtype) -> Iterator[torch.Tensor]:
    """W [out, in] in `acc`, whole when already in it, else a bounded block of rows at a time."""
    if weight.dtype == acc:
        yield weight
        return
    for block in weight.split(max(1, _BLOCK // max(weight.shape[1], 1))):
        yield block.to(acc)


@torch.no_grad()
def row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W_o‖² [out] for W [out, in], accumulated in fp32 (fp64 for fp64)."""
    acc = _acc(weight)
    return torch.cat([block.square().sum(1) for block in _row_blocks(weight, acc)])


@torch.no_grad()
def factored_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B·A‖_row [out] without forming B·A; W [out, in], A [r, in], B [out, r].

    Detached (PEFT treats the norm as a constant, DoRA §4.3); fp32 arithmetic (fp64 for fp64 W),
    autocast off. `weight_sq` is the cached ‖W‖²_row. The squared norm is clamped at 0 before the
    sqrt: cancellation can push it a rounding step below zero when W + sBA has a zero row.
    """
    acc = _acc(weight)
    with torch.autocast(weight.device.type, enabled=False):
        a, b = lora_A.to(acc), lora_B.to(acc)  # [r, in], [out, r]
        wa = torch.cat([block @ a.T for block in _row_blocks(weight, acc)])  # W·Aᵀ [out, r]
        gram = a @ a.T  # [r, r]
        cross = (b * wa).sum(1)  # ⟨W_o, (BA)_o⟩ [out]
        ba_sq = ((b @ gram) * b).sum(1)  # ‖(BA)_o‖² [out]
        w_sq = row_sq_norm(weight) if weight_sq is None else weight_sq.to(acc)
        return (w_sq + 2 * scaling * cross + scaling * scaling * ba_sq).clamp_min(0).sqrt()


class DoraLayer(AdapterLayer, DoraExport):
    """A frozen Linear (or GPT-2 Conv1D) with a DoRA update; adapter tensors in fp32 (fp64 on an
    fp64 base), as `get_peft_model` leaves PEFT's."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, config: LoraConfig,
                 generator: torch.Generator) -> None:
        if not is_linear_like(base):
            raise UsageError(f"dora adapts Linear layers, not {type(base).__name__}; use --targets to pick Linears")
        super().__init__(base)
        weight = weight_matrix(base)  # [out, in], a view for Conv1D's [in, out] storage
        out_f, in_f = weight.shape
        self.scaling = alpha / rank
        a = kaiming_lora_A((rank, in_f), _acc(weight), generator)  # as lora and dora-peft under the same seed
        self.lora_A = nn.Parameter(a.to(weight.device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=a.dtype, device=weight.device))  # [out, r]
        # ‖W‖²_row [out]: W is frozen, so the first norm term is computed once.
        self.register_buffer("weight_sq", row_sq_norm(weight), persistent=False)
        self.magnitude = nn.Parameter(self.weight_sq.sqrt().clone())  # m₀ = ‖W‖_row (B = 0), PEFT's init
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def row_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖_row [out], detached."""
        return factored_row_norm(weight_matrix(self.base), self.lora_A, self.lora_B, self.scaling, self.weight_sq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # [..., out], bias included, the base's dtype
        x = x.to(self.lora_A.dtype)  # PEFT casts the adapter input to the adapter dtype
        base_out = None
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base_out = F.linear(x, weight_matrix(self.base).to(x.dtype))  # W·dropout(x), no bias, as PEFT
        g = self.magnitude / self.row_norm()  # [out]; gradient reaches m only, the norm is a constant
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # B·A·x [..., out]
        bias = getattr(self.base, "bias", None) if base_out is None else None
        return dora_compose(result, lora, g, self.scaling, bias=bias, base=base_out)

    def lora_delta(self) -> LoraDelta:
        return LoraDelta(self.lora_A.detach().float().clone(), self.lora_B.detach().float() * self.scaling,
                         magnitude=self.magnitude.detach().float().clone())


class DoraConfig(LoraConfig):
    """dora's options: LoRA's (its own class: the registry is keyed by config class)."""


register(AdapterMethod(
    name="dora", config_class=DoraConfig, attach=layerwise(DoraLayer),
    paper="Liu et al. 2024, arXiv 2402.09353; factored norm: arXiv 2603.22276",
    summary="DoRA (magnitude × direction) with the row norm from W·Aᵀ and A·Aᵀ, never B·A; fused compose",
    needs={Needs.TRAINING_DATA}, default_lr=DEFAULT_LR))
