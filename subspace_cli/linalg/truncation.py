"""Truncated SVD in a transformed space, and the low-rank factors it gives.

Every low-rank method here has the same shape: pick an invertible M [in, in] (identity for
plain SVD, diag(s) for ASVD, the Cholesky factor L for SVD-LLM), take W·M = U Σ Vᵀ, keep r
triplets, and map back: W′ = (U_r Σ_r^{½}) · (Σ_r^{½} V_rᵀ M⁻¹) = up · down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Transform:
    """M in W·M; kind picks the cheap inverse (identity, diagonal or lower-triangular)."""

    kind: str  # "identity" | "diagonal" | "lower"
    matrix: torch.Tensor | None = None  # [in] for diagonal, [in, in] for lower

    def apply(self, w: torch.Tensor) -> torch.Tensor:  # W [out, in] -> W·M
        if self.kind == "identity":
            return w
        if self.kind == "diagonal":
            return w * self.matrix
        return w @ self.matrix

    def apply_inverse(self, y: torch.Tensor) -> torch.Tensor:  # Y [r, in] -> Y·M⁻¹
        if self.kind == "identity":
            return y
        if self.kind == "diagonal":
            return y / self.matrix
        return torch.linalg.solve_triangular(self.matrix, y, upper=False, left=False)


@dataclass
class Spectral:
    """SVD of W·M (float64): u [out, k], s [k], vh [k, in]."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    transform: Transform

    @property
    def energy(self) -> torch.Tensor:
        return self.s.square()


def decompose(weight: torch.Tensor, transform: Transform) -> Spectral:
    w = weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(transform.apply(w), full_matrices=False)
    return Spectral(u=u, s=s, vh=vh, transform=transform)


def factors(spec: Spectral, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) in float64, singular values split evenly between them."""
    root = spec.s[:rank].sqrt()
    up = spec.u[:, :rank] * root
    down = spec.transform.apply_inverse(root[:, None] * spec.vh[:rank])
    return up, down


def energy_kept(spec: Spectral, rank: int) -> float:
    e = spec.energy
    total = float(e.sum())
    return float(e[:rank].sum()) / total if total > 0 else 1.0


def weighted_relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> float:
    """‖(W − W′)X‖_F / ‖W X‖_F via the Gram (tr(E G Eᵀ)), or the plain Frobenius ratio."""
    w = weight.to(torch.float64)
    err = w - approx.to(torch.float64)
    if gram is None:
        return float(err.norm() / w.norm().clamp_min(1e-30))
    num = torch.einsum("oi,ij,oj->", err, gram, err)
    den = torch.einsum("oi,ij,oj->", w, gram, w)
    return float((num.clamp_min(0) / den.clamp_min(1e-30)).sqrt())
