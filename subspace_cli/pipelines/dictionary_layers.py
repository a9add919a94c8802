"""Replace a group of same-shape matrices by DictionaryLinear modules (sparse-dictionary methods).

A group is one matrix (per-layer mode) or the same projection in `group_size` consecutive
blocks (grouped mode: one dictionary fitted to the stacked whitened rows, whitened by the
Gram averaged over the group, as CoSpaDi does). Each matrix's budget comes from the rank plan
of the low-rank methods (uniform or global), converted to bytes: a group gets the sum of its
members' budgets, so the dictionary's share is paid once.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from subspace_cli.linalg.dictionary_budget import dictionary_size
from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.rank_allocation import MatrixSpec
from subspace_cli.linalg.truncation import decompose, factors, weighted_relative_error
from subspace_cli.modules.lowrank import DictionaryLinear, dictionary_from_factors
from subspace_cli.report.schema import MatrixReport
from subspace_cli.walk import weight_matrix


@dataclass
class Member:
    name: str
    module: nn.Module
    stats: GramStats
    budget: float | None  # 16-bit units; None: keep dense


@dataclass
class GroupResult:
    """What fitting one group produced; merged into the run state by the caller, in order."""

    modules: dict[str, nn.Module] = field(default_factory=dict)  # name -> replacement
    rows: list[MatrixReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # coding / update


def projection_type(name: str) -> str:
    """`model.layers.7.mlp.up_proj` -> `model.layers.*.mlp.up_proj` (the grouping key)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def dictionary_budget(spec: MatrixSpec, rank: int | None, ratio: float, allocation: str) -> float | None:
    """A matrix's storage budget in 16-bit units, from its planned low-rank rank (None: dense)."""
    if rank is None:
        return None
    if allocation == "uniform":
        return (1.0 - ratio) * spec.dense_params  # exact, not rounded down to a whole rank
    return float(rank * spec.rank_cost)


def _dense_row(name: str, weight: torch.Tensor) -> MatrixReport:
    out_f, in_f = weight.shape
    return MatrixReport(name=name, shape=(out_f, in_f), kind="dense", rank=None, params_before=out_f * in_f,
                        params_after=out_f * in_f, whitened_rel_error=0.0, energy_kept=1.0)


def _pooled(members: list[Member]) -> GramStats:
    pooled = GramStats(members[0].stats.gram.shape[0], device=members[0].stats.gram.device)
    for m in members:
        pooled.merge_(m.stats)  # fresh accumulator: q/k/v share one GramStats object
    return pooled


def _svd_llm_reference(state, weight: torch.Tensor, stats: GramStats, params: float, spectral=None) -> float:
    """svd-llm's whitened error at the largest rank that stores no more than `params`."""
    out_f, in_f = weight.shape
    rank = int(params // (in_f + out_f))
    if rank < 1:
        return 1.0
    if spectral is None:
        spectral = decompose(weight, state.method.transform(weight, stats, state.method_config))
    up, down = factors(spectral, min(rank, spectral.s.numel()))
    return weighted_relative_error(weight, up @ down, stats.covariance)


def compress_group(members: list[Member], state, seed: int) -> GroupResult:
    """Fit one dictionary for `members`. Reads `state` only, so groups can run in parallel;
    the generator for `init=columns` is seeded from the group's first name (order-independent)."""
    config = state.method_config
    result = GroupResult()
    weights = {m.name: weight_matrix(m.module).detach() for m in members}
    rows: dict[str, MatrixReport] = {}
    active = [m for m in members if m.budget is not None]
    for m in members:
        if m.budget is None:
            rows[m.name] = _dense_row(m.name, weights[m.name])
    if not active:
        result.rows = [rows[m.name] for m in members]
        return result
    out_f, in_f = weights[active[0].name].shape
    pooled = _pooled(active)
    stacked = torch.cat([weights[m.name] for m in active])  # [g·out, in]
    spectral = decompose(stacked, state.method.transform(stacked, pooled, config))
    size = dictionary_size(in_f, out_f, sum(m.budget for m in active), k_over_s=config.k_over_s,
                           max_atoms=spectral.s.numel(), members=len(active),
                           structure=None if config.structure == "none" else config.structure)
    if size is None:
        names = ", ".join(m.name for m in active)
        result.notes.append(f"ratio {state.config.ratio} is unreachable for {names} at k/s = {config.k_over_s} "
                            "(even one nonzero per output stores more than the budget, or no less than dense): "
                            "kept dense")
        rows.update({m.name: _dense_row(m.name, weights[m.name]) for m in active})
        result.rows = [rows[m.name] for m in members]
        return result

    generator = torch.Generator().manual_seed(seed + zlib.crc32(active[0].name.encode()))
    fitted = state.method.fit(spectral, size, config, generator)
    result.seconds = dict(fitted.fit.seconds)
    energy_kept = 1.0 - fitted.fit.errors[-1] ** 2
    owner: DictionaryLinear | None = None
    for i, m in enumerate(active):
        weight = weights[m.name]
        part = slice(i * out_f, (i + 1) * out_f)
        bias = getattr(m.module, "bias", None)
        module = dictionary_from_factors(
            fitted.dictionary.to(weight.dtype), fitted.values[part].to(weight.dtype), fitted.indices[part],
            None if bias is None else bias.detach().clone(), positions=size.positions).to(weight.device)
        if owner is None:
            owner = module
        else:
            module.share_dictionary(owner)
        params = size.params(in_f, out_f, len(active))
        rows[m.name] = MatrixReport(
            name=m.name, shape=(out_f, in_f), kind="dictionary", rank=None, atoms=size.atoms,
            nonzeros=size.nonzeros, dictionary_of=None if i == 0 else active[0].name,
            params_before=out_f * in_f, params_after=math.ceil(params),
            whitened_rel_error=weighted_relative_error(weight, module.dense_weight().detach(), m.stats.covariance),
            # One member: the group's spectrum is this matrix's own svd-llm spectrum.
            reference_rel_error=_svd_llm_reference(state, weight, m.stats, params,
                                                   spectral if len(active) == 1 else None),
            energy_kept=energy_kept)
        result.modules[m.name] = module
    result.rows = [rows[m.name] for m in members]
    return result
