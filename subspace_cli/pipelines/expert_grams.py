"""Input Grams of mixture-of-experts experts, from the tokens the router sends to each expert.

An experts module (walk/experts.py `ExpertSet`) is called as experts(x [T, H], top_k_index [T, K],
top_k_weights [T, K]). Expert e's gate_up_proj[e] [2I, H] sees x_t for the tokens t routed to e;
its down_proj[e] [H, I] sees a_t = act(g_t)·u_t, (g_t, u_t) = gate_up_proj[e]·x_t, recomputed
here from the current weights in a forward pre-hook.

Weighting: each routed token's rows are scaled by its routing weight w_{t,e}, so the Gram is
Σ_t w² x xᵀ. The block adds w·down_e(a_t), so for down_proj ‖(W − W′)·A‖ under this Gram is
exactly expert e's share of the block's output error (and, to first order, gate_up's): a token
the router barely weighs costs the fit little. Token counts are raw counts.

Fallback: an expert whose routed tokens number fewer than a matrix's input dimension has a
rank-deficient Gram for it, which whitening would fit to those few tokens; that matrix takes the
*pooled* Gram instead: all the tokens entering the layer, unweighted (for gate_up the layer's
input Gram; for down_proj expert e's own activations act(g)·u on every token, a second block
pass run only when some expert needs it). `expert_grams=pooled` (-O on svd-llm / asvd) fits every
expert with the pooled Grams, the comparison the benchmark makes (benchmarks/moe_expert_grams.py).

Memory: per block, E·(H² + I²) float64 Grams, plus one H² pooled Gram per experts module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from subspace_cli.linalg.gram import GramStats
from subspace_cli.walk import ExpertSet

ROUTING_WEIGHTED = True  # rows scaled by the routing weight (module docstring); the benchmark measures both
GATE_UP, DOWN = "gate_up_proj", "down_proj"


@dataclass
class _Record:
    """What one pass recorded on one experts module (this process's share, until reduced)."""

    experts: ExpertSet
    counts: torch.Tensor  # [E] int64: tokens routed to each expert
    routed: dict[tuple[str, int], GramStats] = field(default_factory=dict)  # (matrix, e) -> routed Gram
    pooled_in: GramStats | None = None  # all tokens entering the layer [H, H]
    pooled_down: dict[int, GramStats] = field(default_factory=dict)  # e -> act(g)·u on all tokens [I, I]

    def grams(self) -> dict[str, GramStats]:
        """Every GramStats, keyed for Processes.sum_stats_."""
        path = self.experts.path
        out = {f"{path}.{m}.{e}": g for (m, e), g in self.routed.items()}
        out.update({f"{path}.{DOWN}.{e}:pooled": g for e, g in self.pooled_down.items()})
        if self.pooled_in is not None:
            out[f"{path}:pooled_in"] = self.pooled_in
        return out


def _sizes(experts: ExpertSet) -> tuple[int, int]:
    """(H, I): the inputs of gate_up_proj and of down_proj."""
    down = getattr(experts.module, DOWN)  # [E, H, I]
    return down.shape[1], down.shape[2]


def _activation(experts: ExpertSet, e: int, x: torch.Tensor) -> torch.Tensor:
    """down_proj[e]'s input act(g)·u for rows x [n, H], in float32."""
    weight = getattr(experts.module, GATE_UP)[e]  # [2I, H]
    gate, up = F.linear(x.float(), weight.float()).chunk(2, dim=-1)  # (n, I) each
    return experts.module.act_fn(gate) * up


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return values[0], values[1], values[2]


@contextmanager
def expert_pass(sets: list[ExpertSet], *, routed: bool, pooled_down: dict[str, set[int]] | None = None,
                pooled_in: bool = True) -> Iterator[list[_Record]]:
    """Forward pre-hooks on each experts module while the block runs.

    routed: record each expert's routed Grams (routing-weighted) besides the counts;
    pooled_down: {experts path: experts whose down_proj pooled Gram to record};
    pooled_in: record the layer's input Gram (gate_up's pooled Gram).
    """
    pooled_down = pooled_down or {}
    records = []
    handles = []
    for experts in sets:
        hidden, inner = _sizes(experts)
        device = getattr(experts.module, GATE_UP).device
        record = _Record(experts, torch.zeros(experts.num_experts, dtype=torch.int64))
        if routed:
            for e in range(experts.num_experts):
                record.routed[(GATE_UP, e)] = GramStats(hidden, device=device)
                record.routed[(DOWN, e)] = GramStats(inner, device=device)
        if pooled_in:
            record.pooled_in = GramStats(hidden, device=device)
        record.pooled_down = {e: GramStats(inner, device=device) for e in sorted(pooled_down.get(experts.path, ()))}

        def hook(module, args, kwargs, record=record):
            x, index, weights = _routing_args(args, kwargs)  # [T, H], [T, K], [T, K]
            x = x.detach()
            if record.pooled_in is not None:
                record.pooled_in.update(x)
            for e, stats in record.pooled_down.items():
                stats.update(_activation(record.experts, e, x))
            for e in range(record.experts.num_experts):
                # (k, t) pairs as the model's own loop takes them
                top_k_pos, token_idx = torch.where(index.T == e)
                record.counts[e] += int(token_idx.numel())
                if not record.routed or token_idx.numel() == 0:
                    continue
                rows = x[token_idx].float()  # (n, H)
                scale = weights[token_idx, top_k_pos, None].float() if ROUTING_WEIGHTED else 1.0  # (n, 1)
                record.routed[(GATE_UP, e)].update(rows * scale)
                record.routed[(DOWN, e)].update(_activation(record.experts, e, rows) * scale)

        handles.append(experts.module.register_forward_pre_hook(hook, with_kwargs=True))
        records.append(record)
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ExpertStats:
    """Per expert matrix (dotted name): the Gram that fits it, its expert's token count and which Gram."""

    stats: dict[str, GramStats] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # "routed" | "pooled"
    notes: list[str] = field(default_factory=list)


def _reduce(records: list[_Record], processes, counts: bool) -> None:
    for record in records:
        processes.sum_stats_(record.grams())
        if counts:
            record.counts = processes.sum_(record.counts.to(torch.float64)).round().to(torch.int64)


def _needs_pooled_down(record: _Record, pooled_mode: bool) -> set[int]:
    _, inner = _sizes(record.experts)
    return {e for e in range(record.experts.num_experts) if pooled_mode or int(record.counts[e]) < inner}


def _resolve(record: _Record, pooled_mode: bool, result: ExpertStats) -> None:
    experts = record.experts
    hidden, inner = _sizes(experts)
    fallbacks = []
    for e in range(experts.num_experts):
        count = int(record.counts[e])
        for matrix, width in ((GATE_UP, hidden), (DOWN, inner)):
            name = experts.matrix_name(matrix, e)
            pooled = pooled_mode or count < width
            if pooled:
                result.stats[name] = record.pooled_in if matrix == GATE_UP else record.pooled_down[e]
            else:
                result.stats[name] = record.routed[(matrix, e)]
            result.tokens[name] = count
            result.source[name] = "pooled" if pooled else "routed"
        if not pooled_mode and count < max(hidden, inner):
            which = "both matrices" if count < min(hidden, inner) else (DOWN if count < inner else GATE_UP)
            fallbacks.append(f"expert {e} ({count} tokens: pooled Gram for {which})")
    if fallbacks:
        result.notes.append(f"{experts.path}: too few calibration tokens routed (fewer than a matrix's inputs, "
                            f"{hidden} for {GATE_UP}, {inner} for {DOWN}) for " + ", ".join(fallbacks)
                            + "; fitted with the layer's pooled Gram")


def finish_expert_stats(records: list[_Record], *, pooled_mode: bool, rerun, processes) -> ExpertStats:
    """Sum the first pass over the processes, run the pooled down_proj pass where an expert needs it
    (`rerun()` runs the block again with the same inputs), and pick each matrix's Gram."""
    _reduce(records, processes, counts=True)
    missing = {r.experts.path: _needs_pooled_down(r, pooled_mode) - set(r.pooled_down) for r in records}
    missing = {path: experts for path, experts in missing.items() if experts}
    if missing:  # the same on every process: decided from the summed counts
        sets = [r.experts for r in records if r.experts.path in missing]
        with expert_pass(sets, routed=False, pooled_down=missing, pooled_in=False) as second:
            rerun()
        _reduce(second, processes, counts=False)
        by_path = {r.experts.path: r for r in second}
        for record in records:
            if record.experts.path in by_path:
                record.pooled_down.update(by_path[record.experts.path].pooled_down)
    result = ExpertStats()
    for record in records:
        _resolve(record, pooled_mode, result)
    return result


def first_pass(sets: list[ExpertSet], pooled_mode: bool):
    """The hooks of a block's first run: routed Grams and counts, or (pooled mode) every expert's
    pooled Grams at once."""
    if pooled_mode:
        return expert_pass(sets, routed=False, pooled_down={s.path: set(range(s.num_experts)) for s in sets})
    return expert_pass(sets, routed=True)
