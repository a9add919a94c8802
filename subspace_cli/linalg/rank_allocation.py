"""Choose a rank per matrix under one parameter budget.

A matrix [out, in] at rank r stores r·(in + out) parameters instead of in·out, so factoring
only pays below the break-even rank in·out / (in + out); at or above it the matrix stays dense.

- `uniform`: every matrix keeps the same fraction (1 − ratio) of its parameters.
- `global`: minimise Σ_m loss_m(r_m) subject to Σ_m cost_m(r_m) ≤ budget, where loss_m(r) is
  the (whitened) truncation loss Σ_{i>r} σ_i² of matrix m. Each singular value buys σ_i²
  of loss for (in + out) parameters and the losses are convex in r, so taking singular values
  in order of σ_i² / (in + out) across all matrices is optimal for the relaxed problem
  (the idea of SVD-LLM V2, Wang et al. 2025, arXiv 2503.12340: heterogeneous ranks from
  the theoretical truncation loss). `normalise="relative"` divides each matrix's losses by its
  total energy, so a matrix counts by the fraction of its own signal lost.

`multiple` N keeps every rank a multiple of N (GEMM kernels work in vector widths and tiles, so
an unaligned rank runs about as slow as the next multiple: benchmarks/rank_multiple.py). `global` takes
singular values N at a time, a chunk scoring its summed (normalised) energy per N·(in + out)
parameters, so the budget counts the rounded ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspace_cli.errors import UsageError


@dataclass(frozen=True)
class MatrixSpec:
    name: str
    in_features: int
    out_features: int
    energy: torch.Tensor | None = None  # σ_i² descending, only needed for `global`
    min_rank: int = 1  # global allocation never goes below this rank
    group: str = ""  # budget group: matrices of one group share one budget (e.g. one projection type)

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def rank_cost(self) -> int:
        return self.in_features + self.out_features

    @property
    def break_even(self) -> int:
        """Smallest rank at which factoring no longer saves parameters."""
        return -(-self.dense_params // self.rank_cost)  # ceil


def factored_params(spec: MatrixSpec, rank: int | None) -> int:
    """rank None means the matrix stays dense."""
    return spec.dense_params if rank is None else rank * spec.rank_cost


def _round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


def uniform_ranks(specs: list[MatrixSpec], ratio: float, multiple: int = 1) -> dict[str, int | None]:
    """Every matrix keeps (1 − ratio) of its parameters, its rank rounded down to a multiple (never
    under-remove), at least one multiple."""
    ranks: dict[str, int | None] = {}
    for spec in specs:
        rank = int((1.0 - ratio) * spec.dense_params / spec.rank_cost)  # floor: never under-remove
        rank = max(multiple, rank - rank % multiple)
        ranks[spec.name] = rank if rank < spec.break_even else None
    return ranks


def global_ranks(specs: list[MatrixSpec], ratio: float, normalise: str = "relative",
                 multiple: int = 1) -> dict[str, int | None]:
    """Greedy allocation, run separately inside each budget group."""
    if normalise not in ("absolute", "relative"):
        raise UsageError(f"rank normalisation '{normalise}' is not valid; valid: absolute, relative")
    ranks: dict[str, int | None] = {}
    for group in dict.fromkeys(s.group for s in specs):
        ranks.update(_group_ranks([s for s in specs if s.group == group], ratio, normalise, multiple))
    return ranks


def _group_ranks(specs: list[MatrixSpec], ratio: float, normalise: str, multiple: int) -> dict[str, int | None]:
    budget = (1.0 - ratio) * sum(s.dense_params for s in specs)
    dense: set[str] = set()
    while True:
        ranks = _greedy(specs, budget, dense, normalise, multiple)
        # A matrix whose chosen rank reaches break-even is cheaper dense (and lossless):
        # make it dense and give the freed budget to the others.
        newly_dense = {s.name for s in specs if s.name not in dense and ranks[s.name] >= s.break_even}
        if not newly_dense:
            return {name: (None if name in dense else r) for name, r in ranks.items()}
        dense |= newly_dense


def _floors(factored: list[MatrixSpec], remaining: float, multiple: int) -> dict[str, int]:
    """Each matrix's floor rank rounded up to the multiple; rounded down (at least one multiple)
    where rounding up would overspend. A floor at break-even makes the matrix dense."""
    up = {s.name: min(_round_up(s.min_rank, multiple), s.break_even) for s in factored}
    if multiple == 1 or sum(up[s.name] * s.rank_cost for s in factored) <= remaining:
        return up
    return {s.name: min(max(multiple, s.min_rank - s.min_rank % multiple), s.break_even) for s in factored}


def _greedy(specs: list[MatrixSpec], budget: float, dense: set[str], normalise: str, multiple: int) -> dict[str, int]:
    factored = [s for s in specs if s.name not in dense]
    remaining = budget - sum(s.dense_params for s in specs if s.name in dense)
    ranks = {s.name: 0 for s in specs}
    # Every matrix keeps at least its floor rank: pay for it first.
    ranks.update(_floors(factored, remaining, multiple))
    remaining -= sum(ranks[s.name] * s.rank_cost for s in factored)
    scores, owners, costs = [], [], []
    for idx, s in enumerate(factored):
        if s.energy is None:
            raise ValueError(f"global allocation needs the spectrum of {s.name}")
        floor = ranks[s.name]
        # Chunks of `multiple` singular values from the floor; the last one reaches break-even
        # (taking it means the matrix is cheaper dense).
        chunks = max(0, -(-(s.break_even - floor) // multiple))
        e = s.energy[floor : floor + chunks * multiple].to(torch.float64)
        if normalise == "relative":
            e = e / s.energy.sum().clamp_min(1e-30)
        e = torch.nn.functional.pad(e, (0, chunks * multiple - e.numel()))  # a spectrum shorter than the last chunk
        scores.append(e.reshape(chunks, multiple).sum(1) / (multiple * s.rank_cost))
        owners.append(torch.full((chunks,), idx, dtype=torch.long))
        costs.append(torch.full((chunks,), multiple * s.rank_cost, dtype=torch.float64))
    if not scores:
        return ranks
    score = torch.cat(scores)
    order = torch.argsort(score, descending=True, stable=True)
    spent = torch.cumsum(torch.cat(costs)[order], 0)
    taken = torch.cat(owners)[order][spent <= remaining]
    counts = torch.bincount(taken, minlength=len(factored))
    for idx, s in enumerate(factored):
        ranks[s.name] += multiple * int(counts[idx])
    return ranks


def allocate(specs: list[MatrixSpec], ratio: float, allocation: str, normalise: str = "relative",
             multiple: int = 1) -> dict[str, int | None]:
    """{name: rank, None for dense}: ranks multiples of `multiple`."""
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"--ratio {ratio} is outside (0, 1); it is the fraction of targeted parameters removed")
    if multiple < 1:
        raise UsageError(f"--rank-multiple {multiple} is not valid; it is a whole number >= 1 (1: any rank)")
    if allocation == "uniform":
        return uniform_ranks(specs, ratio, multiple)
    if allocation == "global":
        return global_ranks(specs, ratio, normalise, multiple)
    raise UsageError(f"--allocation '{allocation}' is not valid; valid: uniform, global")
