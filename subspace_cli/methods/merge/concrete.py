"""`concrete`: Concrete subspace mask merge, adapted to causal language models.

Tang et al. 2023, "Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion", arXiv 2310.17400 (authors' code: tanganke/fusion_bench, `method/concrete_subspace/` and
`models/masks/mask_model.py`).

One mask, shared by all T tasks, is learned over the targeted tensors. Its logits ℓ (one per weight
entry) parameterise a relaxed Bernoulli (Concrete / Gumbel-sigmoid) sample

    m = sigmoid((ℓ + log u − log(1 − u)) / temperature),        u ~ U(0, 1)

and the inner merge is task arithmetic on the masked, rescaled task vectors τᵢ = θᵢ − θ₀:

    θ = θ₀ + λ · Σᵢ (m ⊙ τᵢ) / mean(m)

The rescale is per tensor, as in the authors' code (`mask[name] = m / torch.mean(m)` for each
parameter name). ℓ is trained with Adam on unlabeled task data: the merged model's next-token
cross-entropy ("lm"), or its mean prediction entropy (the paper's test-time adaptation objective,
"entropy"), averaged over tasks. The forward goes through `torch.func.functional_call`, so the
model itself is never copied and only ℓ receives gradients.

Export: m = 1[ℓ > 0] ("binary", the mode of Bernoulli(sigmoid ℓ); the authors sample it instead)
or m = sigmoid(ℓ) ("continuous", the authors' default `eval_mask_type`), then the same per-tensor
rescale; a tensor whose exported mask is all zero keeps its base weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.func import functional_call

from subspace_cli.errors import RuntimeFailure, UsageError
from subspace_cli.evaluate.chunked_logits import BatchLogits
from subspace_cli.methods.merge.base import MergeContext, ModelMerge, PreparedMerge
from subspace_cli.methods.merge.task_arithmetic import TaskArithmeticConfig, merge_task_arithmetic
from subspace_cli.methods.registry import MethodConfig, Needs, register

# Every 2-D weight inside the decoder blocks (attention and MLP projections; norms are 1-D).
DEFAULT_TARGETS = r"layers\.\d+\..*\.weight$"
_SHOW = 8  # parameter names listed in an error message


class ConcreteConfig(MethodConfig):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    lambda_: float = Field(
        0.3, alias="lambda", allow_inf_nan=False,
        description="task arithmetic scale λ on the masked, rescaled task vectors (authors' scaling_factor)")
    temperature: float = Field(
        0.5, gt=0, allow_inf_nan=False, description="temperature of the relaxed Bernoulli mask sample")
    initial_logit: float = Field(
        0.0, allow_inf_nan=False,
        description="initial mask logit ℓ for every entry (0: keep probability 1/2)")
    steps: int = Field(50, ge=1, description="Adam steps on the mask logits")
    lr: float = Field(
        1e-3, gt=0, allow_inf_nan=False,
        description="Adam learning rate on the mask logits (the authors'; 0.05 with binary export made SmolLM2 merges "
                    "worse than the base, benchmarks/RESULTS.md)")
    batch_size: int = Field(4, ge=1, description="rows of each task's data per step")
    objective: Literal["lm", "entropy"] = Field(
        "lm", description="lm: next-token cross-entropy on the task data; entropy: mean prediction entropy")
    export: Literal["binary", "continuous"] = Field(
        "continuous", description="exported mask: binary 1[ℓ > 0] or continuous sigmoid(ℓ), then m / mean(m)")
    targets: str | None = Field(
        None, description="regex (re.search) on parameter names the mask covers; "
                          "default: every 2-D weight in the decoder blocks")

    @field_validator("targets")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from exc
        return value


@dataclass
class ConcreteResult:
    merged: dict[str, Tensor]  # name -> merged θ (fp32) for every targeted tensor
    density: dict[str, float]  # name -> fraction nonzero (binary) or mean (continuous) of the exported mask
    losses: list[float] = field(default_factory=list)  # objective per step
    dropped: list[str] = field(default_factory=list)  # exported mask all zero: tensor left at base


def select_targets(model: nn.Module, targets: str | None) -> list[str]:
    """Names (as in `model.named_parameters()`) of the tensors the mask covers."""
    params = dict(model.named_parameters())
    if targets is None:
        pattern = re.compile(DEFAULT_TARGETS)
        names = [n for n, p in params.items() if pattern.search(n) and p.dim() == 2]
    else:
        pattern = re.compile(targets)
        names = [n for n in params if pattern.search(n)]
    if not names:
        shown = ", ".join(list(params)[:_SHOW])
        more = f" (and {len(params) - _SHOW} more)" if len(params) > _SHOW else ""
        raise UsageError(f"concrete targets '{targets or DEFAULT_TARGETS}' match no parameter; "
                         f"available: {shown}{more}")
    return names


def _rescale(mask: Tensor) -> Tensor | None:
    """m / mean(m) per tensor (authors' rescale), or None when the mask is all zero."""
    mean = mask.float().mean()
    if mean.item() == 0.0:
        return None
    return mask.float() / mean


@torch.no_grad()
def merge_with_mask(base: dict[str, Tensor], task_vectors: dict[str, list[Tensor]], masks: dict[str, Tensor],
                    lambda_: float) -> dict[str, Tensor]:
    """θ = θ₀ + λ · Σᵢ m̂ ⊙ τᵢ with m̂ = m / mean(m) per tensor, for every name in `masks` (fp32).

    A tensor whose mask is all zero keeps its base weight (its task vectors are dropped).
    """
    merged: dict[str, Tensor] = {}
    for name, mask in masks.items():
        if name not in base or name not in task_vectors:
            raise UsageError(f"concrete: mask for '{name}' has no base tensor or task vectors")
        theta0 = base[name].detach().float()
        vectors = task_vectors[name]
        if mask.shape != theta0.shape or any(t.shape != theta0.shape for t in vectors):
            raise UsageError(f"concrete: mask or task vector of '{name}' does not match its base shape "
                             f"{tuple(theta0.shape)}")
        scaled = _rescale(mask.to(theta0.device))
        if scaled is None:
            merged[name] = theta0.clone()
            continue
        total = torch.stack([t.to(theta0.device, torch.float32) for t in vectors]).sum(0)  # Σᵢ τᵢ, shape of θ₀
        merged[name] = theta0 + lambda_ * (scaled * total)  # m̂ shared by all tasks: Σᵢ m̂⊙τᵢ = m̂⊙Στᵢ
    return merged


def _check_inputs(model: nn.Module, names: list[str], task_vectors: dict[str, list[Tensor]],
                  batches: list[Tensor], config: ConcreteConfig) -> int:
    """Validates the task vectors and batches; returns the number of tasks T."""
    params = dict(model.named_parameters())
    if not task_vectors:
        raise UsageError("concrete: no task vectors given")
    unknown = [n for n in task_vectors if n not in params]
    if unknown:
        raise UsageError(f"concrete: task vector for '{unknown[0]}', which is not a parameter of the model")
    covered = set(names)
    extra = [n for n in task_vectors if n not in covered]
    if extra:
        raise UsageError(f"concrete: task vector for '{extra[0]}', which targets "
                         f"'{config.targets or DEFAULT_TARGETS}' does not cover")
    missing = [n for n in names if n not in task_vectors]
    if missing:
        raise UsageError(f"concrete: no task vectors for targeted tensor '{missing[0]}' "
                         f"({len(missing)} of {len(names)} targeted tensors lack them)")
    counts = {len(v) for v in task_vectors.values()}
    if len(counts) != 1 or 0 in counts:
        raise UsageError(f"concrete: every targeted tensor needs the same number (≥ 1) of task vectors; "
                         f"got {sorted(counts)}")
    num_tasks = counts.pop()
    for name, vectors in task_vectors.items():
        for i, tau in enumerate(vectors):
            if tau.shape != params[name].shape:
                raise UsageError(f"concrete: task vector {i} of '{name}' has shape {tuple(tau.shape)}, "
                                 f"the parameter {tuple(params[name].shape)}")
    if len(batches) != num_tasks:
        raise UsageError(f"concrete: {num_tasks} task vectors per tensor but {len(batches)} task batches")
    min_len = 2 if config.objective == "lm" else 1
    for i, ids in enumerate(batches):
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise UsageError(f"concrete: task {i} has no rows of token ids (batch shape {tuple(ids.shape)})")
        if ids.shape[1] < min_len:
            raise UsageError(f"concrete: task {i} sequences have {ids.shape[1]} tokens; "
                             f"objective '{config.objective}' needs at least {min_len}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise UsageError(f"concrete: task {i} batch must hold integer token ids, not {ids.dtype}")
    return num_tasks


def _rows(ids: Tensor, step: int, batch_size: int) -> Tensor:
    """Mini-batch `step` of one task: rows cycling deterministically through ids [rows, seqlen]."""
    index = (torch.arange(batch_size) + step * batch_size) % ids.shape[0]
    return ids[index]  # [batch_size, seqlen]


def _entropy_sum(logits: Tensor, positions: slice) -> Tensor:
    """Σ of the prediction entropies of logits [b, c, V] (float32)."""
    logp = logits.log_softmax(-1)  # [b, c, V]
    return -(logp.exp() * logp).sum()


class _Objective(nn.Module):
    """The scalar objective of token ids [b, s] under `model`, for `functional_call` (which swaps the
    merged θ in for one call): logits a chunk of positions at a time, each chunk recomputed in
    backward, so the [b, s, V] logits are never whole (evaluate/chunked_logits.py)."""

    def __init__(self, model: nn.Module, objective: str):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, ids: Tensor) -> Tensor:
        batch = BatchLogits(self.model, ids)
        b, s = ids.shape
        if self.objective == "lm":  # mean next-token cross-entropy over the s − 1 scored positions
            return batch.loss_sum(ids[:, 1:], stop=s - 1) / (b * (s - 1))
        return batch.chunk_sum(_entropy_sum) / (b * s)  # mean prediction entropy over all positions


def fit_concrete_mask(model: nn.Module, task_vectors: dict[str, list[Tensor]], batches: list[Tensor],
                      config: ConcreteConfig, generator: torch.Generator,
                      progress: Callable[[int, float], None] | None = None) -> ConcreteResult:
    """Learns the shared Concrete mask on `batches` (one token-id tensor per task) and exports the merge.

    `model` holds the base weights θ₀ and is left untouched; `progress(step, loss)` is called after
    each step (step counted from 1).
    """
    names = select_targets(model, config.targets)
    num_tasks = _check_inputs(model, names, task_vectors, batches, config)
    params = dict(model.named_parameters())
    device = params[names[0]].device

    base = {n: params[n].detach() for n in names}  # θ₀, the model's own storage (no copy)
    with torch.no_grad():  # Σᵢ τᵢ per tensor: the mask is shared, so Σᵢ m⊙τᵢ = m⊙Στᵢ (one tensor, not T)
        tau_sum = {n: torch.stack([t.to(device, torch.float32) for t in task_vectors[n]]).sum(0)
                   for n in names}
    logits = {n: torch.full(base[n].shape, float(config.initial_logit), dtype=torch.float32, device=device,
                            requires_grad=True) for n in names}  # ℓ, shape of each targeted tensor
    optimizer = torch.optim.Adam(list(logits.values()), lr=config.lr)
    frozen = {n: p.detach() for n, p in params.items()}  # the rest of the model, outside autograd
    objective = _Objective(model, config.objective)  # its parameters are the model's, named "model.<name>"
    tiny = torch.finfo(torch.float32).tiny

    def merge(name: str, noise: Tensor) -> Tensor:
        m = torch.sigmoid((logits[name] + noise) / config.temperature)  # relaxed Bernoulli sample
        scale = config.lambda_ / m.mean().clamp_min(tiny)  # per-tensor m / mean(m)
        return (base[name].float() + scale * (m * tau_sum[name])).to(base[name].dtype)

    losses: list[float] = []
    for step in range(config.steps):
        noise = {}
        for n in names:  # logistic noise log u − log(1 − u), u ~ U(0, 1) from the seeded generator
            u = torch.rand(base[n].shape, generator=generator, device=generator.device).clamp_min(tiny)
            noise[n] = (u.log() - torch.log1p(-u)).to(device)
        # Pass 1: θ without a graph, as leaves; the forward/backward per task gives dL/dθ.
        with torch.no_grad():
            theta = {n: merge(n, noise[n]).requires_grad_() for n in names}
        grads = {n: torch.zeros_like(theta[n]) for n in names}
        total = 0.0
        for ids in batches:
            rows = _rows(ids, step, config.batch_size).to(device)
            weights = {f"model.{n}": p for n, p in {**frozen, **theta}.items()}
            loss = functional_call(objective, weights, (rows,)) / num_tasks
            for n, g in zip(names, torch.autograd.grad(loss, [theta[n] for n in names])):
                grads[n] += g
            total += loss.item()
            del loss
        if total != total or abs(total) == float("inf"):
            raise RuntimeFailure("concrete mask", f"objective is {total} at step {step + 1}")
        del theta
        # Pass 2: dL/dℓ through the merge, one tensor at a time (one small graph alive at once).
        for n in names:
            merge(n, noise[n]).backward(grads.pop(n))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if progress is not None:
            progress(step + 1, total)
    del optimizer

    with torch.no_grad():
        if config.export == "binary":
            masks = {n: (logits[n] > 0).float() for n in names}  # {0, 1}
        else:
            masks = {n: torch.sigmoid(logits[n]) for n in names}  # (0, 1)
        density = {n: m.mean().item() for n, m in masks.items()}
        dropped = [n for n, m in masks.items() if not bool(m.any())]
        merged = merge_with_mask(base, task_vectors, masks, config.lambda_)
    return ConcreteResult(merged=merged, density=density, losses=losses, dropped=dropped)


def stored_names(model: nn.Module, names: list[str], checkpoint) -> dict[str, str]:
    """{parameter name in the model: its tensor's name in the checkpoint}. transformers renames some
    tensors on load (Mixtral's block_sparse_moe.gate -> mlp.gate) and fuses others (per-expert w1 / w3 / w2
    into mlp.experts.gate_up_proj [E, 2I, H] / down_proj): a rename maps back one to one through its own
    reverse conversion; a parameter the checkpoint stores as several tensors cannot carry one mask."""
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for name in names:
        if name in checkpoint:
            out[name] = name
            continue
        shape = tuple(model.get_parameter(name).shape)
        stored = {k: tuple(v.shape) for k, v in
                  revert_weight_conversion(model, {name: torch.empty(shape, device="meta")}).items()}
        if len(stored) != 1 or next(iter(stored)) not in checkpoint or next(iter(stored.values())) != shape:
            raise UsageError(f"concrete targets '{name}' {list(shape)}, which the checkpoint stores as "
                             f"{', '.join(list(stored)[:2])}{' ...' if len(stored) > 2 else ''} (e.g. MoE experts kept "
                             "per expert): narrow -O targets to tensors stored as the model holds them")
        out[name] = next(iter(stored))
    return out


def prepare_concrete(context: MergeContext, config: ConcreteConfig) -> PreparedMerge:
    """Train the shared mask on the base model in memory and merge the targeted tensors with it."""
    with context.stage("load"):
        model, tokenizer = context.load_base()
    if tokenizer is None:
        raise UsageError(f"base '{context.base_label}' has no tokenizer files; concrete needs them to read --data")
    with context.stage("data"):
        batches = context.task_batches(tokenizer)
    names = select_targets(model, config.targets)
    stored = stored_names(model, names, context.base)
    task_vectors = {}
    for name in names:
        theta0 = context.read(context.base, stored[name], context.base_label)
        task_vectors[name] = [w * (context.read(checkpoint, stored[name], label) - theta0)
                              for checkpoint, w, label in zip(context.inputs, context.weights, context.labels)]
    with context.stage("mask"), context.progress("training the concrete mask", config.steps) as advance:
        result = fit_concrete_mask(model, task_vectors, batches, config, torch.Generator().manual_seed(context.seed),
                                   progress=lambda step, loss: advance())
    notes = [f"concrete: the mask of {name} kept nothing; the tensor stays at the base" for name in result.dropped]
    return PreparedMerge(replaced={stored[name]: tensor for name, tensor in result.merged.items()},
                         mask_density={stored[name]: value for name, value in result.density.items()},
                         losses=result.losses, notes=notes)


def merge_untargeted(inputs, config: ConcreteConfig) -> Tensor:
    """Tensors outside the mask: task arithmetic with the same λ (an all-ones mask there)."""
    return merge_task_arithmetic(inputs, TaskArithmeticConfig(lambda_=config.lambda_))


register(ModelMerge(
    name="concrete", config_class=ConcreteConfig, prepare=prepare_concrete, merge=merge_untargeted,
    paper="Tang et al. 2023, arXiv 2310.17400",
    summary="learn one shared Concrete (relaxed Bernoulli) mask on the task vectors from unlabeled task data, "
            "then task arithmetic on the masked vectors",
    needs={Needs.BASE, Needs.TASK_DATA},
))
