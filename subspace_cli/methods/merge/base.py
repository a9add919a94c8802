"""The per-tensor merge contract: what the streaming pipeline hands each merge method, and cheap
diagnostics on the task vectors Δᵢ = θᵢ − θ₀ (elementwise over the N inputs, no decompositions).

Every merge method is a `TensorMerge`: `merge(inputs: TensorInputs, config) -> torch.Tensor` returns
the merged tensor in float32 with the inputs' shape, one tensor at a time, so merging streams. A
`ModelMerge` also needs the models in memory first (e.g. to train a mask on data): `prepare(context,
config) -> PreparedMerge` merges the tensors it owns; the pipeline streams the rest through `merge`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from subspace_cli.methods.registry import Method


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


def _no_check(config: Any, weights: list[float]) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class TensorMerge(Method):
    """A per-tensor merge: merge(inputs, config) -> merged tensor (float32, the inputs' shape)."""

    verb: ClassVar[str] = "merge"
    merge: Callable[[TensorInputs, Any], torch.Tensor]
    # check(config, per-model weights): exit 2 before any tensor is read (e.g. weights that sum to 0).
    check: Callable[[Any, list[float]], None] = _no_check
    # The mergekit `merge_method` with the same semantics and parameter names, if any: mergekit YAML
    # configs naming it run this method (pipelines/merge_yaml.py).
    mergekit: str | None = None


@dataclass
class MergeContext:
    """What the pipeline hands a ModelMerge before streaming. Checkpoints are the lazily read inputs."""

    base: Any  # the base checkpoint (LazyCheckpoint)
    inputs: list[Any]  # one checkpoint per model, in model order
    labels: list[str]  # how messages name each input
    base_label: str  # how messages name the base
    weights: list[float]
    seed: int
    load_base: Callable[[], tuple[Any, Any]]  # () -> (base model in memory, its tokenizer)
    task_batches: Callable[[Any], list[torch.Tensor]]  # tokenizer -> one [n, L] id tensor per model's --data
    read: Callable[[Any, str, str], torch.Tensor]  # (checkpoint, tensor name, label) -> finite float32 tensor
    stage: Callable[[str], AbstractContextManager]  # a timed stage of the report
    progress: Callable[[str, int], AbstractContextManager]  # (description, total) -> advance()


@dataclass
class PreparedMerge:
    replaced: dict[str, torch.Tensor]  # checkpoint tensor name -> merged tensor, written as is
    mask_density: dict[str, float] = field(default_factory=dict)  # per replaced tensor, for the report
    losses: list[float] = field(default_factory=list)  # training curve of whatever `prepare` trained
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ModelMerge(TensorMerge):
    """A merge that works on the models in memory first: prepare(context, config) -> PreparedMerge."""

    prepare: Callable[[MergeContext, Any], PreparedMerge]

