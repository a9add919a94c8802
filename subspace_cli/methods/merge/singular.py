"""Merges in the singular bases of the task matrices Δᵢ = θᵢ − θ₀ (2-D tensors; each Δᵢ is first weighted
by wᵢ):

- `tsv`: Task Singular Vectors merge, TSV-M (Gargiulo et al. 2025, CVPR, arXiv 2412.00081). Keep the top
  k = max(1, r // T) singular triplets of every Δᵢ (r = min(m, n), T models), concatenate them
  (U [m, T·k], σ [T·k], Vᵀ [T·k, n]), replace U and Vᵀ by their polar factors (X = P S Qᵀ → P Qᵀ) to
  remove the interference between tasks, Δ = U⊥ diag(σ) V⊥ᵀ.
- `iso-c`: Isotropic merging in the common subspace (Marczak et al. 2025, "No Task Left Behind",
  arXiv 2502.04959). Δ = Σ wᵢΔᵢ = U Σ Vᵀ, flattened to σ̄·U Vᵀ with σ̄ the mean singular value.
- `iso-cts`: the same with common and task-specific subspaces: the top directions of Σ wᵢΔᵢ, completed by
  each task's top directions outside them, orthogonalised (polar factors), with the isotropic spectrum σ̄
  = mean of all retained singular values.

θ = θ₀ + α·Δ; α = 0 returns θ₀ bit for bit. Tensors that are not 2-D (norms, biases) take the mean of the
weighted task vectors, Σ wᵢΔᵢ / T, times α: what the authors' code does for both papers; so do 2-D tensors
named `…bias` (stacked per-expert biases [E, out] are vectors, not a linear map).

Mixture-of-experts stacks, 3-D tensors [E, out, in] with an `experts` component in their name
(transformers 5's `model.layers.N.mlp.experts.gate_up_proj` / `down_proj`, stored so by some
checkpoints), are E matrices: each expert's slice is merged on its own, as the same expert stored as
separate 2-D tensors (Mixtral's `experts.e.w1.weight`) would be. Flattening the stack, or averaging it
as a non-matrix, would mix the experts' singular bases.

Merging N identical fine-tunes does not give that fine-tune back, by design: tsv keeps only each Δ's top
r // T directions (a Δ of rank ≤ r // T comes back exactly); iso-c and iso-cts flatten the spectrum (σ̄·U Vᵀ)
and iso-c sums Δ N times (the paper's α absorbs the scale).

Numerics: float32 SVDs. A task vector is ~1e-3 of its weight, so SVD errors (~1e-6·‖Δ‖) sit far below the
float32 resolution of θ₀ + Δ; float64 would buy nothing. Singular triplets with σ ≤ σ_max·max(m, n)·ε₃₂
are numerically zero and are dropped: their singular vectors are arbitrary (LAPACK's choice), and in a polar
factor or a flattened spectrum they would inject arbitrary directions with full weight. For full-rank task
vectors (real fine-tunes) this changes nothing; for rank-deficient ones (zero or identical task vectors,
tiny test matrices) it keeps the result deterministic: the polar factor is taken on the range
(a partial isometry) and σ̄ is the mean over the numerical rank.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from subspace_cli.methods.merge.base import TensorInputs, TensorMerge, apply_update, task_vectors
from subspace_cli.methods.registry import MethodConfig, Needs, register

_EPS32 = torch.finfo(torch.float32).eps

# α defaults to 1.0 for every method here. TSV: fusion_bench's TaskSingularVectorMerging config defaults to
# alpha 1. Iso-C / Iso-CTS: the paper tunes α on held-out validation data per model and task count (no
# single recommended value); the authors' code (danielm1405/iso-merging) falls back to a coefficient of 1.0
# when no tuned value is configured, and fusion_bench's iso_c / iso_cts configs default to scaling_factor
# 1.0 (its ViT examples use 1.5).


class TsvConfig(MethodConfig):
    alpha: float = Field(1.0, allow_inf_nan=False,
                         description="α: scale of the merged task vector, θ = θ₀ + α·Δ")
    fraction: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False,
        description="share of each task's singular triplets kept, k = max(1, int(fraction·min(m, n))); "
        "none: 1/T, as in the paper")


class IsoCConfig(MethodConfig):
    alpha: float = Field(1.0, allow_inf_nan=False,
                         description="α: scale of the merged task vector, θ = θ₀ + α·Δ (the paper tunes it on "
                         "validation data)")


class IsoCtsConfig(IsoCConfig):
    common_fraction: float = Field(
        0.8, ge=0, le=1, allow_inf_nan=False, description="share of the rank given to the common subspace (top directions of Σ wᵢΔᵢ); "
        "the rest is split evenly between the tasks (1.0: iso-c)")


# ----------------------------------------------------------------------------- linear algebra


def _cutoff(s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Singular values at or below this are numerically zero (numpy's matrix_rank tolerance)."""
    return s.max() * max(shape) * _EPS32


def top_triplets(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of delta [m, n] with numerically nonzero σ: U [m, k'], σ [k'], Vᵀ [k', n]."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # [m, r], [r], [r, n]
    if s.numel() == 0 or k <= 0:
        return u[:, :0], s[:0], vh[:0]
    keep = min(k, int((s > _cutoff(s, delta.shape)).sum()))  # s is descending
    return u[:, :keep], s[:keep], vh[:keep]


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of x [m, p]: x = P S Qᵀ → P Qᵀ, restricted to x's numerical range.

    For x of full column rank (p ≤ m) the result has orthonormal columns and is the orthonormal matrix
    nearest to x in Frobenius norm; for a full-row-rank x it has orthonormal rows.
    """
    p, s, qh = torch.linalg.svd(x, full_matrices=False)  # [m, q], [q], [q, p]
    if s.numel() == 0:
        return torch.zeros_like(x)
    keep = s > _cutoff(s, x.shape)
    return p[:, keep] @ qh[keep]


def _weighted(inputs: TensorInputs, method: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base, deltas = task_vectors(inputs, method)
    return base, [d * w for d, w in zip(deltas, inputs.weights)]


def _mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(deltas).mean(dim=0)


def _is_matrix(name: str, base: torch.Tensor) -> bool:
    return base.ndim == 2 and base.numel() > 0 and not name.endswith("bias")


def is_expert_stack(name: str, tensor: torch.Tensor) -> bool:
    """A stack of expert matrices [E, out, in] (a 3-D tensor named `….experts.…`), not a conv kernel."""
    return tensor.ndim == 3 and tensor.numel() > 0 and "experts" in name.split(".")


def per_expert(merge):
    """`merge` on each expert's slice [out, in] of an expert stack, stacked back to [E, out, in]; other
    tensors as they are."""

    def build(inputs: TensorInputs, config):
        if inputs.base is None or not is_expert_stack(inputs.name, inputs.base):
            return merge(inputs, config)
        return torch.stack([merge(replace(inputs, name=f"{inputs.name}[{e}]", base=inputs.base[e],
                                          models=[m[e] for m in inputs.models]), config)
                            for e in range(inputs.base.shape[0])])

    return build


def cts_split(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) for iso-cts, as the authors' code splits r = min(m, n):
    common = int(f·r), then rounded so the task-specific part divides evenly into T (Python's round,
    half to even), the common subspace taking the remainder; the two always add up to r."""
    common = int(rank * common_fraction)
    per_task = round((rank - common) / tasks)
    if per_task * tasks > rank:  # small r with many tasks (the authors' code would go negative)
        per_task = rank // tasks
    return rank - per_task * tasks, per_task


# ----------------------------------------------------------------------------- methods


def merge_tsv(inputs: TensorInputs, config: TsvConfig) -> torch.Tensor:
    base, deltas = _weighted(inputs, "tsv")
    if config.alpha == 0 or not deltas:
        return base.clone()
    if not _is_matrix(inputs.name, base):
        return apply_update(base, _mean(deltas), config.alpha)
    rank = min(base.shape)
    k = max(1, int(rank * config.fraction)) if config.fraction is not None else max(1, rank // len(deltas))
    parts = [top_triplets(d, k) for d in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)  # [m, ≤T·k]
    s = torch.cat([p[1] for p in parts])  # [≤T·k]
    vh = torch.cat([p[2] for p in parts], dim=0)  # [≤T·k, n]
    if s.numel() == 0:  # every task vector is zero
        return base.clone()
    merged = (polar_factor(u) * s) @ polar_factor(vh)  # U⊥ diag(σ) V⊥ᵀ [m, n]
    return apply_update(base, merged, config.alpha)


def merge_iso_c(inputs: TensorInputs, config: IsoCConfig) -> torch.Tensor:
    base, deltas = _weighted(inputs, "iso-c")
    if config.alpha == 0 or not deltas:
        return base.clone()
    if not _is_matrix(inputs.name, base):
        return apply_update(base, _mean(deltas), config.alpha)
    u, s, vh = top_triplets(torch.stack(deltas).sum(dim=0), min(base.shape))  # of Σ wᵢΔᵢ
    if s.numel() == 0:
        return base.clone()
    merged = s.mean() * (u @ vh)  # σ̄·U Vᵀ: every nonzero singular value becomes σ̄
    return apply_update(base, merged, config.alpha)


def merge_iso_cts(inputs: TensorInputs, config: IsoCtsConfig) -> torch.Tensor:
    base, deltas = _weighted(inputs, "iso-cts")
    if config.alpha == 0 or not deltas:
        return base.clone()
    if not _is_matrix(inputs.name, base):
        return apply_update(base, _mean(deltas), config.alpha)
    common, per_task = cts_split(min(base.shape), len(deltas), config.common_fraction)
    uc, sc, vhc = top_triplets(torch.stack(deltas).sum(dim=0), common)  # common subspace [m, kc], [kc], [kc, n]
    parts = [(uc, sc, vhc)]
    if per_task > 0:
        for d in deltas:
            outside = d - uc @ (uc.T @ d)  # Δᵢ projected off the common subspace [m, n]
            parts.append(top_triplets(outside, per_task))
    s = torch.cat([p[1] for p in parts])  # [≤r]
    if s.numel() == 0:
        return base.clone()
    u = polar_factor(torch.cat([p[0] for p in parts], dim=1))  # [m, ≤r]
    vh = polar_factor(torch.cat([p[2] for p in parts], dim=0))  # [≤r, n]
    merged = s.mean() * (u @ vh)  # isotropic spectrum: σ̄ = mean of the retained singular values
    return apply_update(base, merged, config.alpha)


register(TensorMerge(
    name="tsv", config_class=TsvConfig, merge=per_expert(merge_tsv),
    paper="Gargiulo et al. 2025 (CVPR), arXiv 2412.00081 (Task Singular Vectors, TSV-M)",
    summary="keep each task matrix's top 1/T singular triplets, orthogonalise the concatenated bases, add to the base",
    needs={Needs.BASE},
))
register(TensorMerge(
    name="iso-c", config_class=IsoCConfig, merge=per_expert(merge_iso_c),
    paper="Marczak et al. 2025, arXiv 2502.04959 (No Task Left Behind: Iso-C)",
    summary="sum the task matrices and flatten their singular spectrum to its mean",
    needs={Needs.BASE},
))
register(TensorMerge(
    name="iso-cts", config_class=IsoCtsConfig, merge=per_expert(merge_iso_cts),
    paper="Marczak et al. 2025, arXiv 2502.04959 (No Task Left Behind: Iso-CTS)",
    summary="common subspace of the summed task matrices plus task-specific directions, flat spectrum",
    needs={Needs.BASE},
))
