"""Compress the experts of a mixture-of-experts block: each expert's matrices factored on their own.

An experts module keeps gate_up_proj [E, 2I, H] and down_proj [E, H, I] as 3-D parameters
(walk/experts.py `ExpertSet`). Every expert's slice is a matrix of its own, with its own rank (the
rank plan counts it as it counts any Linear) and its own Gram (pipelines/expert_grams.py). The
module is replaced by a LowRankExperts (modules/remote_modeling.py) whose forward reproduces the
model's eager expert loop; the router is never touched. Before the first replacement of each
experts class, that forward is checked against the class's own on random routing, so a family
whose experts compute something else is left dense with a note rather than silently changed.
"""

from __future__ import annotations

import torch
from torch import nn

from subspace_cli.modules.lowrank import LowRankExperts
from subspace_cli.pipelines.expert_grams import ExpertStats
from subspace_cli.pipelines.factoring import factor_matrix
from subspace_cli.walk import EXPERT_MATRICES, ExpertMatrix, ExpertSet

_CHECKED: dict[type, bool] = {}
# Relative: summing in another order (or transformers' grouped_mm) moves float32 by ~1e-7, bf16 by
# ~1e-3; a different computation (no routing weights, another gate) moves the output by O(1).
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


def _empty_like_set(experts: ExpertSet, ranks: dict[str, list[int | None]], device=None) -> LowRankExperts:
    cube = getattr(experts.module, EXPERT_MATRICES[0])
    matrices = {}
    for name in EXPERT_MATRICES:
        _, out_f, in_f = getattr(experts.module, name).shape  # [E, out, in]
        matrices[name] = (in_f, out_f, ranks[name])
    return LowRankExperts(experts.num_experts, matrices, experts.module.act_fn, dtype=cube.dtype,
                          device=device or cube.device)


@torch.no_grad()
def reproduces_forward(experts: ExpertSet) -> bool:
    """Whether LowRankExperts (all experts dense, weights shared with the module, no copy) computes
    what the module computes, on 16 random tokens routed top-2; checked once per class."""
    cls = type(experts.module)
    if cls not in _CHECKED:
        probe = _empty_like_set(experts, {n: [None] * experts.num_experts for n in EXPERT_MATRICES}, device="meta")
        for name in EXPERT_MATRICES:
            cube = getattr(experts.module, name)
            for e, linear in enumerate(probe.lowrank[name]):
                linear.weight = nn.Parameter(cube[e], requires_grad=False)  # a view
        generator = torch.Generator().manual_seed(0)
        hidden = getattr(experts.module, EXPERT_MATRICES[1]).shape[1]
        cube = getattr(experts.module, EXPERT_MATRICES[0])
        x = torch.randn(16, hidden, generator=generator).to(cube.device, cube.dtype)  # [T, H]
        k = min(2, experts.num_experts)
        index = torch.rand(16, experts.num_experts, generator=generator).topk(k, dim=-1).indices.to(cube.device)
        weights = torch.rand(16, k, generator=generator).softmax(-1).to(cube.device)  # [T, K]
        expected = experts.module(x, index, weights)
        got = probe(x, index, weights)
        tolerance = CHECK_TOLERANCE.get(cube.dtype, 3e-2)
        _CHECKED[cls] = bool((got - expected).float().norm() <= tolerance * expected.float().norm().clamp_min(1e-30))
    return _CHECKED[cls]


def compress_experts(experts: ExpertSet, targeted: dict[str, ExpertMatrix], stats: ExpertStats | None,
                     ranks: dict[str, int | None], state) -> nn.Module | None:
    """Factor the targeted matrices of one experts module; returns its LowRankExperts, or None when
    every matrix stays dense (the module is then kept as it is, bit for bit)."""
    plan = {name: [None] * experts.num_experts for name in EXPERT_MATRICES}
    factored: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, matrix in targeted.items():
        row = {}
        if stats is not None:
            row = {"tokens": stats.tokens.get(name), "gram": stats.source.get(name)}
        pair = factor_matrix(matrix.weight(), None if stats is None else stats.stats.get(name), ranks[name], state,
                             name, **row)
        if pair is not None:
            factored[(matrix.param, matrix.index)] = pair
            plan[matrix.param][matrix.index] = pair[0].shape[1]
    if not factored:
        return None
    module = _empty_like_set(experts, plan)
    with torch.no_grad():
        for name in EXPERT_MATRICES:
            cube = getattr(experts.module, name)  # [E, out, in]
            for e, target in enumerate(module.lowrank[name]):
                if (name, e) in factored:
                    up, down = factored[(name, e)]
                    target.up.weight.copy_(up)
                    target.down.weight.copy_(down)
                else:
                    target.weight.copy_(cube[e])  # dense expert: the same bits
    return module
