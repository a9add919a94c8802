"""Sparse dictionary learning: Y [m, n] ≈ D·S, D [m, k] with unit-norm atoms, S [k, n] with
exactly s nonzeros per column (a union of subspaces instead of one shared subspace).

Alternates batched OMP (sparse coding) and approximate K-SVD (dictionary update), as CoSpaDi
does (Makhov, Shopkhoev et al., "CoSpaDi: Compressing LLMs via Calibration-Guided Sparse
Dictionary Learning", arXiv 2509.22075). Both steps are written for speed on CPU:

- OMP runs on all columns at once from the Gram G = DᵀD (Rubinstein, Zibulevsky & Elad 2008,
  "Efficient implementation of the K-SVD algorithm using batch OMP"). Instead of re-solving
  G[I, I]·γ = α[I] at every step, it grows the inverse Cholesky factor B = L⁻¹ of G[I, I] one
  row at a time (two batched mat-vecs), so each step costs O(k·t + t²) per column and no
  triangular solves; the residual correlations Dᵀr shrink by one rank-1 term per step.
- K-SVD updates each atom by one power-iteration step on its restricted residual, with the
  codes re-fitted before and after, so no update can increase the error (block-coordinate
  descent); the residual R = Y − D·S is kept and updated by rank-1 terms, never recomputed.
- Re-coding (optional) is accepted per column only where it lowers that column's error, so the
  total error never increases across iterations either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

# A new atom whose component orthogonal to the atoms already chosen has less than this share of
# its energy is linearly dependent on them: it gets a zero coefficient instead of a huge one.
_DEPENDENT = 1e-10
# Working set of one OMP chunk: columns × s × s floats for B.
_OMP_CHUNK_FLOATS = 2**25


@dataclass
class SparseCode:
    """Column o of S holds coeffs[o, j] at row indices[o, j]; indices [n, s] int64, coeffs [n, s]."""

    indices: torch.Tensor
    coeffs: torch.Tensor

    def dense(self, atoms: int) -> torch.Tensor:
        """S as a dense [k, n] matrix."""
        n = self.indices.shape[0]
        return torch.zeros(n, atoms, dtype=self.coeffs.dtype).scatter_(1, self.indices, self.coeffs).T.contiguous()


@dataclass
class DictionaryFit:
    dictionary: torch.Tensor  # [m, k], unit-norm columns
    code: SparseCode
    errors: list[float]  # relative error ‖Y − D·S‖_F / ‖Y‖_F: after the first coding, then after each update
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage: coding, update


def _group_full(counts: torch.Tensor, atoms: int) -> torch.Tensor:
    """[b, k/4] counts of chosen atoms per group of 4 -> [b, k] True where the group holds 2 (2:4)."""
    return (counts >= 2).repeat_interleave(4, dim=1)[:, :atoms]


def _omp_chunk(gram: torch.Tensor, corr: torch.Tensor, nonzeros: int, structured: bool) -> SparseCode:
    """OMP for a chunk of columns. gram [k, k]; corr [b, k] = (DᵀY)ᵀ for these columns."""
    b, k = corr.shape
    c = corr.clone()  # residual correlations Dᵀr, [b, k]
    diag = gram.diagonal()
    rows = torch.arange(b)
    chosen = torch.zeros(b, k, dtype=torch.bool)
    indices = torch.zeros(b, nonzeros, dtype=torch.long)
    inv_chol = torch.zeros(b, nonzeros, nonzeros, dtype=corr.dtype)  # B = L⁻¹, L·Lᵀ = G[I, I]
    inv_chol_t = torch.zeros(b, nonzeros, nonzeros, dtype=corr.dtype)  # Bᵀ: row-vector products stream fastest
    proj = torch.zeros(b, nonzeros, dtype=corr.dtype)  # a = B·α[I]: coordinates on the orthonormalised atoms
    counts = torch.zeros(b, -(-k // 4), dtype=torch.long) if structured else None
    for t in range(nonzeros):
        blocked = chosen if counts is None else chosen | _group_full(counts, k)
        new = c.abs().masked_fill_(blocked, -1.0).argmax(dim=1)  # [b]
        g_new = diag[new]
        if t:
            cross = gram[new].gather(1, indices[:, :t])  # G[I, new], [b, t]
            w = torch.bmm(cross.unsqueeze(1), inv_chol_t[:, :t, :t]).squeeze(1)  # L⁻¹·G[I, new]
            residual_norm2 = g_new - w.square().sum(1)
        else:
            residual_norm2 = g_new
        independent = residual_norm2 > _DEPENDENT * g_new
        inv_norm = torch.where(independent, residual_norm2.clamp_min(1e-300).rsqrt(), torch.zeros_like(g_new))
        if t:
            # Inverse of [[L, 0], [wᵀ, ν]] is [[B, 0], [−wᵀB/ν, 1/ν]].
            row = torch.bmm(w.unsqueeze(1), inv_chol[:, :t, :t]).squeeze(1) * -inv_norm[:, None]
            inv_chol[:, t, :t] = row
            inv_chol_t[:, :t, t] = row
        inv_chol[:, t, t] = inv_norm
        inv_chol_t[:, t, t] = inv_norm
        a = c[rows, new] * inv_norm  # the residual is orthogonal to earlier atoms: uᵀy = d_newᵀr / ν
        proj[:, t] = a
        indices[:, t] = new
        chosen[rows, new] = True
        if counts is not None:
            counts[rows, new // 4] += 1
        # Dᵀu_t = Σ_j B[t, j]·G[I_j, :]: a weighted sum of Gram rows per column.
        dtu = F.embedding_bag(indices[:, : t + 1], gram, per_sample_weights=inv_chol[:, t, : t + 1], mode="sum")
        c -= a[:, None] * dtu
    coeffs = torch.bmm(proj.unsqueeze(1), inv_chol).squeeze(1)  # γ = Bᵀ·a
    return SparseCode(indices, coeffs)


def _threshold(corr: torch.Tensor, nonzeros: int, structured: bool) -> SparseCode:
    """Exact OMP for an orthonormal dictionary: keep the largest |DᵀY| (top 2 of every 4 for 2:4)."""
    n, k = corr.shape
    if structured:
        groups = corr.abs().reshape(n, k // 4, 4)
        keep = groups.topk(2, dim=2).indices + 4 * torch.arange(k // 4).view(1, -1, 1)
        top = keep.reshape(n, -1)
        ranked = corr.abs().gather(1, top).argsort(dim=1, descending=True)[:, :nonzeros]
        indices = top.gather(1, ranked)
    else:
        indices = corr.abs().topk(nonzeros, dim=1).indices
    return SparseCode(indices, corr.gather(1, indices))


def batched_omp(dictionary: torch.Tensor, target: torch.Tensor, nonzeros: int, *,
                structure: str | None = None) -> SparseCode:
    """Exactly `nonzeros` atoms per column of target [m, n] from dictionary [m, k] (unit columns).

    structure "2:4": at most 2 of every 4 consecutive atoms per column (k a multiple of 4).
    """
    atoms = dictionary.shape[1]
    if not 1 <= nonzeros <= atoms:
        raise ValueError(f"OMP needs 1 <= nonzeros <= atoms, got {nonzeros} and {atoms}")
    structured = structure == "2:4"
    if structured and (atoms % 4 or 2 * nonzeros > atoms):
        raise ValueError(f"2:4 structure needs atoms divisible by 4 and nonzeros <= atoms/2, got {atoms}, {nonzeros}")
    gram = dictionary.T @ dictionary  # [k, k]
    corr = (dictionary.T @ target).T.contiguous()  # [n, k]
    if torch.allclose(gram, torch.eye(atoms, dtype=gram.dtype), atol=1e-6):
        return _threshold(corr, nonzeros, structured)
    chunk = max(16, _OMP_CHUNK_FLOATS // (nonzeros * nonzeros))
    parts = [_omp_chunk(gram, corr[i : i + chunk], nonzeros, structured) for i in range(0, corr.shape[0], chunk)]
    return SparseCode(torch.cat([p.indices for p in parts]), torch.cat([p.coeffs for p in parts]))


def ksvd_update_(target: torch.Tensor, dictionary: torch.Tensor, code: SparseCode,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """One approximate K-SVD sweep over the atoms, in place on `dictionary` and `code`.

    For atom j with users ω (columns whose support holds j) and E = R + d_j·s_jᵀ restricted to ω:
    s̃ = Eᵀd_j (best codes for the old atom), d = E·s̃ / ‖E·s̃‖ (one power-iteration step on E·Eᵀ),
    s = Eᵀd. Supports stay fixed. An atom nobody uses is moved to the worst-fitted column.
    Returns the residual R = Y − D·S [m, n].
    """
    m, atoms = dictionary.shape
    dense = code.dense(atoms)  # [k, n]
    users = torch.zeros_like(dense, dtype=torch.bool).T.scatter_(1, code.indices, True).T  # [k, n]
    r = target - dictionary @ dense if residual is None else residual
    for j in range(atoms):
        mask = users[j].to(r.dtype)
        d, s_old = dictionary[:, j], dense[j]
        if not bool(users[j].any()):
            worst = r.square().sum(0).argmax()
            norm = r[:, worst].norm()
            if norm > 0:
                dictionary[:, j] = r[:, worst] / norm
            continue
        s_fit = (r.T @ d + s_old * (d @ d)) * mask  # Eᵀd on ω
        e_s = r @ s_fit + d * (s_old @ s_fit)  # E·s̃
        norm = e_s.norm()
        if norm == 0:
            continue
        d_new = e_s / norm
        s_new = (r.T @ d_new + s_old * (d @ d_new)) * mask
        # R ← E − d_new·s_newᵀ = R + d·s_oldᵀ − d_new·s_newᵀ, one rank-2 GEMM.
        r.addmm_(torch.stack([d, -d_new], dim=1), torch.stack([s_old, s_new]))
        dictionary[:, j] = d_new
        dense[j] = s_new
    code.coeffs = dense.T.gather(1, code.indices)
    return r


def fit_dictionary(target: torch.Tensor, initial: torch.Tensor, nonzeros: int, *, iterations: int = 8,
                   recode_every: int = 0, tolerance: float = 1e-3, structure: str | None = None) -> DictionaryFit:
    """Code `target` [m, n] on `initial` [m, k] (columns get normalised) by OMP, then run up to
    `iterations` K-SVD dictionary updates.

    recode_every N > 0 re-runs OMP after every N-th update (the paper alternates every time,
    N = 1; each OMP pass costs far more than an update, see docs/compress.md). Stops early once
    an update lowers the relative error by less than `tolerance` times the previous error.
    """
    dictionary = initial / initial.norm(dim=0).clamp_min(1e-30)
    total = target.norm().clamp_min(1e-30)
    seconds = {"coding": 0.0, "update": 0.0}

    start = time.perf_counter()
    code = batched_omp(dictionary, target, nonzeros, structure=structure)
    residual = target - dictionary @ code.dense(dictionary.shape[1])
    seconds["coding"] += time.perf_counter() - start
    errors = [float(residual.norm() / total)]
    for step in range(1, iterations + 1):
        start = time.perf_counter()
        residual = ksvd_update_(target, dictionary, code, residual)
        seconds["update"] += time.perf_counter() - start
        errors.append(float(residual.norm() / total))
        if errors[-2] - errors[-1] < tolerance * errors[-2]:
            break
        if recode_every and step % recode_every == 0 and step < iterations:
            start = time.perf_counter()
            code, residual = _recode(dictionary, target, nonzeros, structure, code, residual)
            seconds["coding"] += time.perf_counter() - start
    return DictionaryFit(dictionary, code, errors, seconds)


def _recode(dictionary, target, nonzeros, structure, code, residual):
    """Fresh OMP codes, kept per column only where they lower the column's error (OMP is greedy)."""
    fresh = batched_omp(dictionary, target, nonzeros, structure=structure)
    fresh_residual = target - dictionary @ fresh.dense(dictionary.shape[1])
    better = fresh_residual.square().sum(0) < residual.square().sum(0)  # [n]
    code = SparseCode(torch.where(better[:, None], fresh.indices, code.indices),
                      torch.where(better[:, None], fresh.coeffs, code.coeffs))
    return code, torch.where(better[None, :], fresh_residual, residual)
