"""Truncated SVD of a tall matrix (a vocabulary embedding or LM head, [V, d] with V ≫ d) through its
[d, d] Gram, so nothing of size V is formed in float64.

`decompose` takes the thin SVD of W·M in float64: for a 262k × 2048 embedding that is a 4 GiB copy
and a 4 GiB U. Here (W·M)ᵀ(W·M) = Mᵀ(WᵀW)M is accumulated over row chunks (float32 products
summed in float64, as linalg/gram.py), its eigendecomposition gives Σ² and V, and only the kept
r columns of U = W·M·V_r·Σ_r⁻¹ are computed, chunk by chunk, in the weight's dtype. Squaring
loses the singular values below ~1e-8·σ₁, far under any rank kept here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspace_cli.linalg.truncation import Spectral, Transform

ROW_CHUNK = 8192


def _row_chunks(weight: torch.Tensor):
    for start in range(0, weight.shape[0], ROW_CHUNK):
        yield start, weight[start:start + ROW_CHUNK]


def _transform_gram(gram: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Mᵀ·G·M for G = WᵀW [in, in]."""
    if transform.kind == "identity":
        return gram
    if transform.kind == "diagonal":
        return transform.matrix[:, None] * gram * transform.matrix[None, :]
    return transform.matrix.T @ gram @ transform.matrix


@dataclass
class TallSpectral(Spectral):
    """Σ and Vᵀ of W·M; `u` is empty and `up` computes the kept columns from `weight`."""

    weight: torch.Tensor | None = None  # [out, in], the matrix itself (not copied)


@torch.no_grad()
def tall_decompose(weight: torch.Tensor, transform: Transform) -> TallSpectral:
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)  # [in, in]
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32  # fast BLAS, float64 sums
    for _, rows in _row_chunks(weight):
        chunk = rows.to(work)
        gram += (chunk.T @ chunk).to(torch.float64)
    evals, evecs = torch.linalg.eigh(_transform_gram(gram, transform))  # ascending
    s = evals.flip(0).clamp_min(0).sqrt()  # [in] descending
    vh = evecs.flip(1).T  # [in, in], rows are right singular vectors
    empty = torch.empty(weight.shape[0], 0, dtype=torch.float64, device=weight.device)
    return TallSpectral(u=empty, s=s, vh=vh, transform=transform, weight=weight)


@torch.no_grad()
def tall_factors(spec: TallSpectral, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r] in the weight's dtype, down [r, in] float64), the split of `factors`:
    up = U_r Σ_r^{½} = W·M·V_r·Σ_r^{-½}, down = Σ_r^{½} V_rᵀ M⁻¹."""
    root = spec.s[:rank].sqrt()
    down = spec.transform.apply_inverse(root[:, None] * spec.vh[:rank])
    live = root > root[0] * 1e-12 if rank else root > 0
    inverse = torch.where(live, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    # W·M·V_r as W·(M·V_r): M·V_r is [in, r], never an [out, in] float64 product
    project = spec.transform.matrix[:, None] * spec.vh[:rank].T if spec.transform.kind == "diagonal" else (
        spec.vh[:rank].T if spec.transform.kind == "identity" else spec.transform.matrix @ spec.vh[:rank].T)
    project = project * inverse[None, :]  # [in, r]
    weight = spec.weight
    up = torch.empty(weight.shape[0], rank, dtype=weight.dtype, device=weight.device)
    for start, rows in _row_chunks(weight):
        up[start:start + rows.shape[0]] = (rows.to(torch.float64) @ project).to(weight.dtype)
    return up, down


@torch.no_grad()
def tall_relative_error(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                        gram: torch.Tensor | None) -> float:
    """`weighted_relative_error(weight, up @ down, gram)` over row chunks (no [out, in] float64 copy)."""
    num = den = 0.0
    down = down.to(torch.float64)
    for start, rows in _row_chunks(weight):
        w = rows.to(torch.float64)
        err = w - up[start:start + rows.shape[0]].to(torch.float64) @ down
        if gram is None:
            num, den = num + float(err.square().sum()), den + float(w.square().sum())
        else:
            num += float(torch.einsum("oi,ij,oj->", err, gram, err))
            den += float(torch.einsum("oi,ij,oj->", w, gram, w))
    return (max(num, 0.0) / max(den, 1e-30)) ** 0.5
