"""`asvd`: activation-aware SVD. Scales input channels by S = diag(mean|x|)^α before the SVD,
so channels with large activations are approximated more accurately: W ≈ SVD_r(W·S)·S⁻¹.

Reference: Z. Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for
Compressing Large Language Models", arXiv 2312.05821 (Eq. 4, α = 0.5 by default).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.truncation import Transform
from subspace_cli.methods.compress.base import LowRankMethod
from subspace_cli.methods.registry import MethodConfig, Needs, register


class ASVDConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0.0, le=2.0, description="exponent α on mean |x| per input channel")
    expert_grams: Literal["routed", "pooled"] = Field(
        "routed", description="MoE experts: fit each expert with the Gram of the tokens routed to it (weighted by "
        "routing weight), or of all its layer's tokens")


def asvd_transform(weight: torch.Tensor, stats: GramStats | None, config: ASVDConfig) -> Transform:
    scale = stats.abs_mean.to(torch.float64).pow(config.alpha)  # [in]
    # Dead channels would make S singular; give them the smallest live scale.
    floor = scale[scale > 0].min() if bool((scale > 0).any()) else torch.tensor(1.0, dtype=torch.float64)
    return Transform("diagonal", scale.clamp_min(float(floor)))


register(LowRankMethod(
    name="asvd", config_class=ASVDConfig, transform=asvd_transform,
    paper="Yuan et al. 2023, arXiv 2312.05821", summary="activation-scaled SVD", needs={Needs.CALIBRATION},
))
