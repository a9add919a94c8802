"""Summaries of a singular-value spectrum s (1-D, descending, non-negative). Pure torch, no I/O.

- `effective_rank`: Roy & Vetterli 2007, "The effective rank: a measure of effective
  dimensionality", eq. (3): erank = exp(H(p)) with p_i = s_i / Σ_j s_j and H the Shannon
  entropy (0·log 0 = 0). It lies in [1, len(s)] and equals n for n equal singular values.
- `rank_for_energy`: the smallest r with Σ_{i<r} s_i² ≥ fraction · Σ_i s_i², i.e. the rank a
  truncated SVD needs to keep that fraction of the Frobenius energy.
"""

from __future__ import annotations

import torch


def _as_spectrum(s: torch.Tensor) -> torch.Tensor:
    if s.ndim != 1:
        raise ValueError(f"expected a 1-D spectrum, got shape {tuple(s.shape)}")
    return s.detach().to(torch.float64).clamp_min(0.0)


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of p = s / Σ s (0.0 for an all-zero or empty spectrum)."""
    s = _as_spectrum(s)
    total = s.sum()
    if s.numel() == 0 or total <= 0:
        return 0.0
    p = s / total
    nz = p[p > 0]
    return float(torch.exp(-(nz * nz.log()).sum()))


def rank_for_energy(s: torch.Tensor, fraction: float) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ fraction · Σ s² (0 for fraction 0 or a zero spectrum)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"energy fraction must be in [0, 1], got {fraction}")
    energy = _as_spectrum(s).square()
    total = float(energy.sum())
    if energy.numel() == 0 or total <= 0 or fraction <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0)
    # Relative slack of a few ulps so that fraction=1 is reached at the last index despite
    # rounding in the cumulative sum.
    target = fraction * total * (1.0 - 1e-12)
    r = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype)).item()) + 1
    return min(r, energy.numel())


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """σ of a 2-D matrix, descending. Computed on the tall orientation: LAPACK's divide and
    conquer on a wide [576, 1536] float64 matrix takes ~2.5× as long as on its transpose."""
    return torch.linalg.svdvals(m.T if m.shape[0] < m.shape[1] else m)


def normalised_spectrum(s: torch.Tensor) -> torch.Tensor:
    """s / s_1 as float64 (zeros when s_1 = 0), for plotting spectra of different scales."""
    s = _as_spectrum(s)
    if s.numel() == 0 or s[0] <= 0:
        return torch.zeros_like(s)
    return s / s[0]
