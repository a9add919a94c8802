"""Subspace algebra of SSPU: feature selection, orthonormal bases, the control vector, span-restricted updates.

"Model Unlearning via Sparse Autoencoder Subspace Guided Projections" (SSPU), Wang et al. 2025,
arXiv 2505.24428. With an SAE on the output h_l of block l (decoder rows d_i, activations z_i):

* feature selection: contrast_i = E_forget[z_i] − E_retain[z_i]. Relevant features: the n_rel with the
  largest contrast (only contrast > 0 counts). Irrelevant features: among the features that fire on
  retain data (E_retain[z_i] > 0) and are not relevant, the n_irr with the lowest E_forget[z_i]
  (ties: larger E_retain[z_i] first, i.e. well-used general features). The paper describes them as
  the features "least correlated with the forget topic"; this concrete rule is ours (we could not
  retrieve the paper's exact scoring formula). If too few features fire on retain, the remaining
  non-relevant features with the lowest forget activation fill up, with a note.
* subspaces: A = [d_i for i in S]ᵀ [d, m], reduced QR A = Q R, Q [d, r] an orthonormal basis of span(A)
  (rank-deficient A: see `orthonormal_basis`). Q_rel spans the relevant features, Q_irr the irrelevant.
* control vector: u = c · Q_irr g / ‖Q_irr g‖, g ~ N(0, I_r): a random direction inside span(Q_irr),
  the target of the forget activations in the RMU-style loss ‖h_l(forget) − u‖².
* constrained updates: for a Linear whose output is the residual stream (W [d, in]), W = W₀ + Q_rel C
  with only C [r, in] trainable (zero at start), so ΔW = Q_rel C has its column space in span(Q_rel)
  exactly, whatever the optimizer does; `bake` turns W₀ + Q_rel C back into a plain weight. (The paper
  projects the gradient onto the relevant span; reparametrising is the same constraint, and it holds
  for Adam's per-coordinate steps too, which a projected gradient fed to Adam would not.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from subspace_cli.methods.unlearn.sae import TopKSAE


@dataclass
class FeatureSelection:
    relevant: list[int]  # feature indices, largest contrast first
    irrelevant: list[int]  # feature indices, lowest forget activation first
    contrast: torch.Tensor  # [F] mean z on forget − mean z on retain
    notes: list[str] = field(default_factory=list)  # e.g. fewer features than asked


@torch.no_grad()
def _mean_activation(sae: TopKSAE, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean SAE activation per feature over the rows of x [n, d] -> [F] (float64)."""
    total = torch.zeros(sae.W_dec.shape[0], dtype=torch.float64, device=sae.W_dec.device)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk].to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        total += sae.encode(rows).sum(0, dtype=torch.float64)
    return total / max(x.shape[0], 1)


def select_features(sae: TopKSAE, forget_acts: torch.Tensor, retain_acts: torch.Tensor,
                    n_relevant: int, n_irrelevant: int) -> FeatureSelection:
    """Relevant and irrelevant SAE features from forget activations [n_f, d] and retain activations [n_r, d]."""
    forget = _mean_activation(sae, forget_acts)  # [F]
    retain = _mean_activation(sae, retain_acts)  # [F]
    contrast = forget - retain  # [F]
    features = contrast.shape[0]
    notes: list[str] = []

    order = torch.argsort(contrast, descending=True, stable=True)
    relevant = [int(i) for i in order[:n_relevant] if contrast[i] > 0]
    if len(relevant) < n_relevant:
        notes.append(f"only {len(relevant)} of the {n_relevant} relevant features asked for are more active on "
                     "forget than on retain data")

    # Lowest forget activation first, ties broken by larger retain activation (lexicographic sort).
    taken = torch.zeros(features, dtype=torch.bool, device=contrast.device)
    taken[relevant] = True
    by_retain = torch.argsort(retain, descending=True, stable=True)
    ranked = by_retain[torch.argsort(forget[by_retain], stable=True)]  # [F]
    free = ranked[~taken[ranked]]  # [F − n_rel]
    irrelevant = free[retain[free] > 0][:n_irrelevant].tolist()
    if len(irrelevant) < n_irrelevant:
        rest = free[retain[free] <= 0][:n_irrelevant - len(irrelevant)].tolist()
        notes.append(f"only {len(irrelevant)} features fire on retain data outside the relevant set; "
                     f"{len(rest)} never-firing features fill the irrelevant set of {n_irrelevant}")
        irrelevant += rest
    return FeatureSelection(relevant=relevant, irrelevant=irrelevant, contrast=contrast.float().cpu(), notes=notes)


def orthonormal_basis(directions: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis [d, r] of the span of the rows of `directions` [m, d]; r = its numerical rank.

    Reduced QR of directionsᵀ in float64 (Householder). When some |R_ii| < tol·max|R_jj| (tol: `rtol`, or
    max(m, d)·eps of the input dtype if larger, as numpy's matrix_rank: a float32 input is only known
    to ~1e-7, so its exact combinations can leave residuals above 1e-6) the input is
    rank-deficient, and simply dropping those columns of Q would be wrong: unpivoted QR puts an
    arbitrary unit vector there and later columns may have a component along it. So then the basis is
    rebuilt by Gram–Schmidt with reorthogonalisation (CGS2), skipping every column whose residual
    after projection on the kept ones is below the same tolerance. Result cast back to the input dtype.
    """
    m, d = directions.shape
    a = directions.detach().to(torch.float64).T  # [d, m]
    if m == 0:
        return directions.new_zeros(d, 0)
    q, r = torch.linalg.qr(a, mode="reduced")  # q [d, min(d, m)], r [min(d, m), m]
    diagonal = r.diagonal().abs()
    # rtol, or the input's own rounding level as numpy's matrix_rank has it (max(m, d)·eps of its dtype).
    rtol = max(rtol, min(max(m, d) * torch.finfo(directions.dtype).eps, 1e-3))  # capped for bf16 / fp16
    tolerance = rtol * float(diagonal.max()) if diagonal.numel() else 0.0
    if tolerance > 0 and bool((diagonal >= tolerance).all()):  # full column rank (or rank d when m > d)
        return q.to(directions.dtype)
    kept: list[torch.Tensor] = []
    for column in a.T:  # [d] each
        v = column.clone()
        for _ in range(2):  # "twice is enough"
            if kept:
                basis = torch.stack(kept, dim=1)  # [d, r]
                v = v - basis @ (basis.T @ v)
        norm = float(v.norm())
        if norm >= tolerance and norm > 0 and len(kept) < d:
            kept.append(v / norm)
    if not kept:
        return directions.new_zeros(d, 0)
    return torch.stack(kept, dim=1).to(directions.dtype)


def control_vector(irrelevant_basis: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """u [d] = scale · Q g / ‖Q g‖, g ~ N(0, I_r) drawn from `generator` (CPU): a random vector of norm `scale` in span(Q)."""
    d, r = irrelevant_basis.shape
    if r == 0:
        raise ValueError("the irrelevant subspace is empty: no direction for the control vector")
    g = torch.randn(r, generator=generator, dtype=torch.float64)  # [r]
    u = irrelevant_basis.detach().to(device="cpu", dtype=torch.float64) @ g  # [d]
    u = u * (scale / u.norm())
    return u.to(device=irrelevant_basis.device, dtype=irrelevant_basis.dtype)


class SpanUpdate(nn.Module):
    """Parametrization W ↦ W + Q C, Q [out, r] a fixed buffer, C trainable and zero at start.

    W [out, in] (a Linear): C [r, in]. W [out] (a norm's gain): C [r]. W [E, out, in] (experts stored
    as one 3-D parameter): C [E, r, in], and Q C broadcasts to [E, out, in]. In every case each
    column of ΔW along the output axis lies in span(Q).
    """

    def __init__(self, basis: torch.Tensor, coef_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("basis", basis.detach().clone())  # Q [out, r]
        self.coef = nn.Parameter(torch.zeros(coef_shape, dtype=basis.dtype, device=basis.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.basis @ self.coef  # the weight's shape


class ScaledUpdate(nn.Module):
    """Parametrization W ↦ W + k·Δ, Δ trainable and zero at start: Adam's steps on Δ move W k times as far."""

    def __init__(self, like: torch.Tensor, k: float):
        super().__init__()
        self.k = k
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.k * self.delta


def scaled_updates(module: nn.Module, name: str, k: float) -> nn.Parameter:
    """Freeze module.<name> and train it as W₀ + k·Δ; returns Δ (same shape). Undo with `bake`."""
    weight = getattr(module, name)
    weight.requires_grad_(False)
    update = ScaledUpdate(weight.detach(), k)
    parametrize.register_parametrization(module, name, update)
    return update.delta


def _coef_shape(weight: torch.Tensor, r: int) -> tuple[int, ...] | None:
    """C's shape for a weight whose output axis (0; 1 for [E, out, in]) has Q's rows; None for other ranks."""
    if weight.dim() == 1:
        return (r,)
    if weight.dim() == 2:
        return (r, weight.shape[1])
    if weight.dim() == 3:
        return (weight.shape[0], r, weight.shape[2])
    return None


def restrict_updates(module: nn.Module, basis: torch.Tensor, name: str = "weight") -> nn.Parameter:
    """Freeze module.<name> (W [out, in], a gain [out] or experts [E, out, in]) and make W = W₀ + Q C
    its only trainable form; returns C ([r, in], [r] or [E, r, in]).

    `basis` Q [out, r] (orthonormal columns, e.g. from `orthonormal_basis`) is moved to the weight's
    device and dtype. Undo with `bake`.
    """
    weight = getattr(module, name)
    out_axis = 1 if weight.dim() == 3 else 0
    shape = _coef_shape(weight, basis.shape[-1]) if basis.dim() == 2 else None
    if shape is None or basis.shape[0] != weight.shape[out_axis]:
        raise ValueError(f"restrict_updates needs a basis [out, r] for a weight [out, in], [out] or [E, out, in]; got "
                         f"basis {tuple(basis.shape)} for weight {tuple(weight.shape)}")
    weight.requires_grad_(False)
    update = SpanUpdate(basis.to(device=weight.device, dtype=weight.dtype), shape)
    parametrize.register_parametrization(module, name, update)
    return update.coef


def bake(module: nn.Module, name: str = "weight") -> None:
    """Replace the parametrized weight by a plain Parameter holding W₀ + Q C (checkpoint keys as before).

    The baked weight stays frozen (requires_grad False), like the original after `restrict_updates`.
    """
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
