"""Whitening by the Cholesky factor of an input Gram (SVD-LLM, Wang et al. 2024, arXiv 2403.07378).

With G = L Lᵀ, ‖(W − W′) X‖_F = ‖(W − W′) L‖_F for the calibration inputs X, so truncating
the SVD of W·L drops exactly the loss of each discarded singular value (truncation-aware).
"""

from __future__ import annotations

import torch

from subspace_cli.errors import RuntimeFailure


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """(1 − λ)·G + λ·diag(G): pulls the Gram toward its diagonal so whitening trusts the
    calibration domain's correlations less (a remedy against cross-domain overfitting)."""
    if shrinkage <= 0:
        return gram
    return (1.0 - shrinkage) * gram + shrinkage * torch.diag(torch.diagonal(gram))


def cholesky_whitener(gram: torch.Tensor, *, max_tries: int = 12) -> torch.Tensor:
    """Lower-triangular L (float64, [in, in]) with G + δI = L Lᵀ.

    δ starts at 0 and grows from 1e-8·mean(diag G) by 10× until G + δI is positive definite
    (dead input channels and too few tokens make G singular).
    """
    gram = gram.to(torch.float64)
    scale = torch.diagonal(gram).mean().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    shift = 0.0
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if int(info) == 0:
            return factor
        shift = float(scale) * 1e-8 * (10.0**attempt)
    raise RuntimeFailure("whitening", "input Gram is not positive definite even after shifting its diagonal")
