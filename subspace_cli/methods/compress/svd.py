"""`svd`: data-free truncated SVD, W ≈ U_r Σ_r V_rᵀ (Eckart–Young optimal in Frobenius norm).

Reference: C. Eckart, G. Young, "The approximation of one matrix by another of lower rank",
Psychometrika 1936.
"""

from __future__ import annotations

import torch

from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.truncation import Transform
from subspace_cli.methods.compress.base import LowRankMethod
from subspace_cli.methods.registry import MethodConfig, register


class SVDConfig(MethodConfig):
    pass


def svd_transform(weight: torch.Tensor, stats: GramStats | None, config: SVDConfig) -> Transform:
    return Transform("identity")


register(LowRankMethod(
    name="svd", config_class=SVDConfig, transform=svd_transform,
    paper="Eckart & Young 1936 (truncated SVD)", summary="data-free truncated SVD",
))
