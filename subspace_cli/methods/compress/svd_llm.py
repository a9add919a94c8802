"""`svd-llm`: truncation-aware data whitening. With the calibration Gram G = L Lᵀ (Cholesky,
float64), W ≈ SVD_r(W·L)·L⁻¹ and each discarded singular value σ_i adds exactly σ_i² to
‖(W − W′)X‖_F² (SVD-LLM Theorem 3.2).

Reference: X. Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
Language Model Compression", arXiv 2403.07378 (ICLR 2025), Eq. 3–5. The shrinkage option
(1 − λ)G + λ·diag(G) is ours: it trades calibration fit for robustness on other domains.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.truncation import Transform
from subspace_cli.linalg.whitening import cholesky_whitener, shrink_gram
from subspace_cli.methods.compress.base import LowRankMethod
from subspace_cli.methods.registry import MethodConfig, Needs, register


class SVDLLMConfig(MethodConfig):
    shrinkage: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="λ in (1−λ)·G + λ·diag(G): shrink the Gram toward its diagonal (cross-domain robustness)",
    )
    expert_grams: Literal["routed", "pooled"] = Field(
        "routed", description="MoE experts: fit each expert with the Gram of the tokens routed to it (weighted by "
        "routing weight), or of all its layer's tokens")


def svd_llm_transform(weight: torch.Tensor, stats: GramStats | None, config: SVDLLMConfig) -> Transform:
    gram = shrink_gram(stats.covariance, config.shrinkage)  # [in, in] float64
    return Transform("lower", cholesky_whitener(gram))


register(LowRankMethod(
    name="svd-llm", config_class=SVDLLMConfig, transform=svd_llm_transform,
    paper="Wang et al. 2024, arXiv 2403.07378", summary="whitened, truncation-aware SVD",
    needs={Needs.CALIBRATION},
))
