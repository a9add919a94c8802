"""The per-tensor merge contract: what the streaming pipeline hands each merge method, and cheap
diagnostics on the task vectors Δᵢ = θᵢ − θ₀ (elementwise over the N inputs, no decompositions).

Every merge method is registered with `verb="merge"` and a `build(inputs: TensorInputs, config) ->
torch.Tensor` that returns the merged tensor in float32 with the inputs' shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorInputs:
    name: str                      # the tensor's name in the checkpoint, e.g. "model.layers.0.mlp.up_proj.weight"
    base: torch.Tensor | None      # fp32, the base model's tensor (None for methods that need no base)
    models: list[torch.Tensor]     # fp32, one per fine-tuned model, same shape as base
    weights: list[float]           # per-model weight (mergekit's `weight`), len == len(models)
    densities: list[float]         # per-model density in (0, 1] (mergekit's `density`), len == len(models)
    generator: torch.Generator     # CPU generator seeded per tensor by the pipeline (for DARE's random drops)


def fp32(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 (no copy when it already is)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def require_base(inputs: TensorInputs, method: str) -> torch.Tensor:
    if inputs.base is None:
        raise ValueError(f"merge method '{method}' needs the base tensor for '{inputs.name}'")
    return fp32(inputs.base)


def task_vectors(inputs: TensorInputs, method: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(θ₀, [Δᵢ = θᵢ − θ₀]) in float32, each of the tensor's shape."""
    base = require_base(inputs, method)
    return base, [fp32(model) - base for model in inputs.models]


def task_vector_stats(base: torch.Tensor, models: list[torch.Tensor]) -> dict:
    """Sign disagreement between the task vectors of one tensor.

    sign_conflict: among entries where at least two Δᵢ are nonzero, the fraction where two of them have
    opposite signs (0.0 when no entry has two nonzero Δᵢ). Δᵢ > 0 is θᵢ > θ₀ for finite floats (gradual
    underflow keeps a difference of unequal floats nonzero), so no Δᵢ is formed; counts are [*shape] int16.
    """
    base = fp32(base)
    counter = torch.int16 if len(models) < 2**15 else torch.int32
    positive = torch.zeros(base.shape, dtype=counter, device=base.device)
    negative = torch.zeros_like(positive)
    for model in models:
        model = fp32(model)
        positive += model > base
        negative += model < base
    eligible = int(((positive + negative) >= 2).sum())
    conflicting = int(((positive > 0) & (negative > 0)).sum())  # implies ≥ 2 nonzero
    return {"sign_conflict": conflicting / eligible if eligible else 0.0}


def merged_sparsity(base: torch.Tensor, merged: torch.Tensor) -> float:
    """Fraction of entries where the merged task vector merged − θ₀ is exactly zero, i.e. merged == θ₀
    for finite floats (0.0 for empty tensors)."""
    if merged.numel() == 0:
        return 0.0
    return int(fp32(merged).eq(fp32(base)).sum()) / merged.numel()


def apply_update(base: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """θ₀ + scale·Δ; scale = 0 returns a copy of θ₀ bit for bit (even where Δ is not finite)."""
    if scale == 0:
        return base.clone()
    return base + (delta if scale == 1 else delta * scale)
