"""Elementwise merges with mergekit 0.1.5's semantics (option names, defaults and edge cases):

- `linear`: Σ wᵢθᵢ / Σ wᵢ (Wortsman et al. 2022, "Model soups", arXiv 2203.05482).
- `task-arithmetic`: θ₀ + λ·Σ wᵢΔᵢ, Δᵢ = θᵢ − θ₀ (Ilharco et al. 2023, arXiv 2212.04089).
- `ties`: trim each Δᵢ to its top-density magnitudes, elect a sign per entry, average the agreeing
  entries (Yadav et al. 2023, "TIES-Merging", arXiv 2306.01708).
- `dare-linear` / `dare-ties`: drop each entry of Δᵢ with probability 1 − density, then task arithmetic /
  TIES sign election (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099).

Edge cases, as mergekit 0.1.5 computes them:
- Every method but linear is mergekit's generalized task arithmetic: sparsify each Δᵢ, weight it,
  optionally elect signs, sum, divide by the weight sum when `normalize`, scale by λ, add to θ₀.
- normalize divisor: without sign election Σ wᵢ, replaced by 1 when |Σ wᵢ| < 1e-8; with sign
  election the per-entry sum of the weights of the agreeing models, replaced by 1 where it is 0.
  `linear` has no such guard: Σ wᵢ = 0 with normalize gives inf/NaN (the pipeline rejects non-finite
  tensors).
- Magnitude trimming keeps k = max(1, int(density·numel)) entries (density ≥ 1: no trimming; ≤ 0: all
  zero), found by a linear-time radix select; only when equal nonzero magnitudes straddle the k-th
  position are they ranked by torch's sort, as in mergekit.
- `rescale` is mergekit's L1 rescale, not DARE's 1/density: the kept entries are scaled so that
  Σ|kept| = Σ|Δᵢ| (skipped when either sum is < 1e-7). It is the unbiased 1/density in expectation.
  Density ≥ 1 leaves Δᵢ untouched and draws no random numbers.
- Sign election runs on the weighted, sparsified task vectors: `sum` elects the sign of Σ wᵢΔᵢ,
  `count` the sign held by more models; a zero total elects +. Zero entries (sign 0) never agree.
- λ = 0 returns θ₀ bit for bit. Everything runs in float32 (mergekit runs task arithmetic in the
  inputs' dtype, so bf16 inputs differ by bf16 rounding there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from subspace_cli.errors import UsageError
from subspace_cli.linalg.selection import largest_k_mask
from subspace_cli.methods.merge.base import TensorInputs, TensorMerge, apply_update, fp32, require_base
from subspace_cli.methods.registry import MethodConfig, Needs, register

_RESCALE_EPS = 1e-7  # mergekit: no rescale when Σ|Δ| or Σ|kept| is below this
_WEIGHT_SUM_EPS = 1e-8  # mergekit: normalize divides by 1 when |Σ wᵢ| is below this


# ----------------------------------------------------------------------------- configs


class LinearConfig(MethodConfig):
    normalize: bool = Field(True, description="divide by the sum of the weights (false: Σ wᵢθᵢ)")


class TaskArithmeticConfig(MethodConfig):
    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(
        1.0, alias="lambda", allow_inf_nan=False,
        description="λ: scale of the merged task vector, θ = θ₀ + λ·Δ (also accepted as lambda_)")
    normalize: bool = Field(False, description="divide the merged task vector by the sum of the weights")
    rescale: bool = Field(False, description="accepted for mergekit compatibility; no effect without sparsification")


class TiesConfig(TaskArithmeticConfig):
    normalize: bool = Field(True, description="divide each entry by the summed weights of the models that agree "
                            "with the elected sign")
    rescale: bool = Field(False, description="after trimming, rescale each task vector to its original L1 norm")
    consensus: Literal["sum", "count"] = Field(
        "sum", description="sign election: sum = sign of Σ wᵢΔᵢ (TIES); count = the sign most models have")


class DareLinearConfig(TaskArithmeticConfig):
    rescale: bool = Field(True, description="after the random drop, rescale each task vector to its original L1 "
                          "norm (mergekit's rescale; ≈ 1/density)")


class DareTiesConfig(DareLinearConfig):
    consensus: Literal["sum", "count"] = Field(
        "sum", description="sign election: sum = sign of Σ wᵢΔᵢ (TIES); count = the sign most models have")


# ----------------------------------------------------------------------------- shared helpers


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """kept·(Σ|Δ| / Σ|kept|), or kept unchanged when either norm is below 1e-7."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def magnitude_trim(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, int(density·numel)) largest |Δ| entries, zero the rest."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    magnitudes = delta.abs().reshape(-1)  # [numel]
    mask = largest_k_mask(magnitudes, k)  # linear time; None only when a sort's tie order decides
    if mask is None:
        # A full sort, as mergekit ranks: equal nonzero magnitudes across the k-th position (common in
        # deltas of bf16 checkpoints) are then broken exactly as mergekit breaks them.
        order = torch.argsort(magnitudes, descending=True)  # [numel]
        mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
        mask[order[:k]] = True
    mask = mask.to(delta.dtype)
    kept = delta * mask.view_as(delta)  # multiplying keeps mergekit's signed zeros
    return l1_rescale(delta, kept) if rescale else kept


def random_drop(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli mask drawn on the CPU generator)."""
    if density >= 1:
        return delta
    # Drawn on the CPU so the mask depends only on the seed, not on the device the tensors live on;
    # the same draw as mergekit's torch.bernoulli under torch.manual_seed(seed).
    probs = torch.full(delta.shape, float(density), dtype=torch.float32)
    keep = torch.bernoulli(probs, generator=generator).to(device=delta.device, dtype=delta.dtype)
    kept = delta * keep
    return l1_rescale(delta, kept) if rescale else kept


def elect_sign(weighted: torch.Tensor, consensus: Literal["sum", "count"]) -> torch.Tensor:
    """[N, *shape] bool: which weighted task-vector entries agree with the elected sign.

    mergekit's sign(x) == majority, without a float sign tensor: agreeing with + is x > 0, with − is
    x < 0 (zeros and NaNs never agree), and the count vote is #positive − #negative.
    """
    positive, negative = weighted > 0, weighted < 0  # [N, *shape] bool each
    if consensus == "sum":
        total = weighted.sum(dim=0)  # [*shape]
    else:
        total = positive.sum(dim=0) - negative.sum(dim=0)
    return torch.where(total >= 0, positive, negative)  # a zero total elects +


def stack_task_vectors(inputs: TensorInputs, method: str,
                       sparsify: Callable[[torch.Tensor, float], torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ₀, [N, *shape] stacked sparsify(Δᵢ, densityᵢ)), filled one model at a time in model order, so
    only one unsparsified Δᵢ is alive at once."""
    base = require_base(inputs, method)
    stacked = torch.empty((len(inputs.models), *base.shape), dtype=torch.float32, device=base.device)
    for i, (model, density) in enumerate(zip(inputs.models, inputs.densities)):
        delta = fp32(model) - base
        stacked[i] = sparsify(delta, density) if sparsify is not None else delta
        del delta
    return base, stacked


def combine(base: torch.Tensor, stacked: torch.Tensor, weights: list[float],
            consensus: Literal["sum", "count"] | None, normalize: bool, lambda_: float) -> torch.Tensor:
    """θ₀ + λ·(Σ wᵢΔᵢ [over agreeing entries]) / divisor: mergekit's generalized task arithmetic.

    `stacked` [N, *shape] holds the (sparsified) Δᵢ and is overwritten: the products are taken in place,
    with the same elementwise operations and reduction order as mergekit's out-of-place ones.
    """
    if stacked.shape[0] == 0 or lambda_ == 0:
        return base.clone()
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * base.ndim))  # [N, 1...]
    stacked.mul_(w)
    if consensus is not None:
        agree = elect_sign(stacked, consensus)  # [N, *shape] bool
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
        mixed = stacked.mul_(agree).sum(dim=0)
        del agree
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)  # [1...]
        divisor = torch.where(divisor.abs() < _WEIGHT_SUM_EPS, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return apply_update(base, mixed, lambda_)


# ----------------------------------------------------------------------------- methods


def merge_linear(inputs: TensorInputs, config: LinearConfig) -> torch.Tensor:
    w = torch.tensor(inputs.weights, dtype=torch.float32)  # [N]
    merged = torch.zeros_like(fp32(inputs.models[0]))
    for model, weight in zip(inputs.models, w):  # one pass per model
        merged.addcmul_(fp32(model), weight.to(merged.device))
    if config.normalize:
        merged = merged / w.sum().to(merged.device)  # no zero guard, as in mergekit
    return merged


def merge_task_arithmetic(inputs: TensorInputs, config: TaskArithmeticConfig) -> torch.Tensor:
    base, stacked = stack_task_vectors(inputs, "task-arithmetic")
    return combine(base, stacked, inputs.weights, None, config.normalize, config.lambda_)


def merge_ties(inputs: TensorInputs, config: TiesConfig) -> torch.Tensor:
    base, stacked = stack_task_vectors(
        inputs, "ties", lambda delta, density: magnitude_trim(delta, density, config.rescale))
    return combine(base, stacked, inputs.weights, config.consensus, config.normalize, config.lambda_)


def _dare(consensus: Callable[[TaskArithmeticConfig], Literal["sum", "count"] | None], name: str):
    def build(inputs: TensorInputs, config: DareLinearConfig) -> torch.Tensor:
        if config.lambda_ == 0:
            return require_base(inputs, name).clone()
        base, stacked = stack_task_vectors(  # in model order: one draw each
            inputs, name, lambda delta, density: random_drop(delta, density, config.rescale, inputs.generator))
        return combine(base, stacked, inputs.weights, consensus(config), config.normalize, config.lambda_)

    build.__name__ = f"merge_{name.replace('-', '_')}"
    return build


merge_dare_linear = _dare(lambda config: None, "dare-linear")
merge_dare_ties = _dare(lambda config: config.consensus, "dare-ties")

def check_linear(config: LinearConfig, weights: list[float]) -> None:
    if config.normalize and sum(weights) == 0:
        raise UsageError(f"--weights {','.join(f'{w:g}' for w in weights)} sum to 0 and linear divides by their sum; "
                         "change the weights or pass -O normalize=false")


register(TensorMerge(
    name="linear", mergekit="linear", config_class=LinearConfig, merge=merge_linear, check=check_linear,
    paper="Wortsman et al. 2022, arXiv 2203.05482 (model soups)",
    summary="weighted average of the models, Σ wᵢθᵢ / Σ wᵢ (no base needed)",
))
register(TensorMerge(
    name="task-arithmetic", mergekit="task_arithmetic", config_class=TaskArithmeticConfig, merge=merge_task_arithmetic,
    paper="Ilharco et al. 2023, arXiv 2212.04089 (task arithmetic)",
    summary="θ₀ + λ·Σ wᵢ(θᵢ − θ₀): add the weighted task vectors to the base", needs={Needs.BASE},
))
register(TensorMerge(
    name="ties", mergekit="ties", config_class=TiesConfig, merge=merge_ties,
    paper="Yadav et al. 2023, arXiv 2306.01708 (TIES-Merging)",
    summary="trim each task vector to its top-density magnitudes, elect signs, average the agreeing entries",
    needs={Needs.BASE},
))
register(TensorMerge(
    name="dare-linear", mergekit="dare_linear", config_class=DareLinearConfig, merge=merge_dare_linear,
    paper="Yu et al. 2024, arXiv 2311.03099 (DARE)",
    summary="drop task-vector entries at random (keep probability = density), rescale, task arithmetic",
    needs={Needs.BASE},
))
register(TensorMerge(
    name="dare-ties", mergekit="dare_ties", config_class=DareTiesConfig, merge=merge_dare_ties,
    paper="Yu et al. 2024, arXiv 2311.03099 (DARE)",
    summary="drop task-vector entries at random (keep probability = density), rescale, TIES sign election",
    needs={Needs.BASE},
))
