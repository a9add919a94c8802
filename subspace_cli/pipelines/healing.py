"""Healing: a short distillation of a compressed model toward the dense model it came from.

The compressed model's own parameters train (low-rank factors, a dictionary's atoms and its
nonzero values; the atom positions are buffers and stay as they are), so the written checkpoint
has the same format, parameter count and sparsity pattern as before. The loss is the KL
divergence from the dense teacher's next-token distribution (knowledge distillation, Hinton et
al. 2015, arXiv 1503.02531; as recovery after compression in e.g. "SliceGPT", Ashkboos et al.
2024, arXiv 2401.15024, Sec. 4, and the LoRA recovery step of "SVD-LLM", Wang et al. 2024,
arXiv 2403.07378), the plain next-token loss (`lm`), or their mean (`mix`).

The teacher never sits in memory beside the student: its top-k next-token log-probabilities on
the healing rows are computed first ([N, L−1, k] ids and values, plus the log of the mass
outside them), then it is dropped. The KL is taken between the two distributions coarsened to
those k tokens plus one "everything else" bucket: exact for that partition, a lower bound of
the full KL, and equal to it at k = V − 1 (the default k = 64 keeps most of the mass).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.errors import RuntimeFailure, UsageError
from subspace_cli.evaluate.chunked_logits import BatchLogits, vocab_size
from subspace_cli.evaluate.perplexity import check_seqlen, perplexity
from subspace_cli.io import data
from subspace_cli.io.training_data import TokenBatchSet
from subspace_cli.modules.checkpoint import param_count
from subspace_cli.modules.lowrank import FACTORED_TYPES, DictionaryLinear
from subspace_cli.pipelines.datasets import mixed_rows
from subspace_cli.pipelines.heal_options import HealOptions
from subspace_cli.pipelines.progress import progress_bar
from subspace_cli.pipelines.trainer import TrainResult, TrainSettings, train
from subspace_cli.report.schema import HealingReport

log = logging.getLogger(__name__)

HEAL_LOSSES = ("kl", "lm", "mix")


@dataclass
class TeacherTargets:
    """The dense teacher's next-token distribution at every position of the healing rows."""

    ids: torch.Tensor  # [N, L-1, k] int32: its k most likely next tokens
    logprobs: torch.Tensor  # [N, L-1, k] float32: their log-probabilities under the full softmax
    log_tail: torch.Tensor  # [N, L-1] float32: log of the probability outside those k


def _top_k_split(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (top-k ids [..., k], their log-probs [..., k], log of the rest [...])."""
    logprobs = logits.float().log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values, log_outside(logprobs, ids)


def log_outside(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ ids} p(v) from log-probs [..., V] and ids [..., k], stable when it is tiny."""
    masked = logprobs.scatter(-1, ids, float("-inf"))
    return masked.logsumexp(-1)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, input_ids: torch.Tensor, top_k: int, batch_size: int, device) -> TeacherTargets:
    """The teacher's top-k next-token targets for rows [N, L] (full rows, no padding)."""
    n, length = input_ids.shape
    k = min(top_k, vocab_size(teacher) - 1)  # the tail keeps one token at least: its log is finite
    ids = torch.empty(n, length - 1, k, dtype=torch.int32)
    logprobs = torch.empty(n, length - 1, k)
    log_tail = torch.empty(n, length - 1)
    was_training = teacher.training
    teacher.eval()
    with progress_bar("teacher targets", total=-(-n // batch_size)) as advance:
        for start in range(0, n, batch_size):
            rows = slice(start, min(n, start + batch_size))
            batch = BatchLogits(teacher, input_ids[rows].to(device))
            for positions in batch.chunks(stop=length - 1):  # position t predicts token t+1
                top, values, tail = _top_k_split(batch.logits(positions), k)
                ids[rows, positions] = top.to(torch.int32).cpu()
                logprobs[rows, positions] = values.cpu()
                log_tail[rows, positions] = tail.cpu()
            advance()
    teacher.train(was_training)
    return TeacherTargets(ids, logprobs, log_tail)


def coarse_kl(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
              teacher_log_tail: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student) on {the teacher's top k} ∪ {the rest}.

    student_logits [b, c, V]; ids / teacher_logprobs [b, c, k]; teacher_log_tail [b, c].
    """
    student = student_logits.float().log_softmax(-1)
    ids = ids.long()
    student_top = student.gather(-1, ids)  # [b, c, k]
    student_tail = log_outside(student, ids)  # [b, c]
    top = (teacher_logprobs.exp() * (teacher_logprobs - student_top)).sum(-1)
    tail = teacher_log_tail.exp() * (teacher_log_tail - student_tail)
    return (top + tail).sum()


def heal_loss_fn(targets: TeacherTargets | None, kind: str) -> Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]:
    """loss(model, batch, rows): the mean per-token loss of one micro-batch of healing rows.

    kl: KL to the teacher; lm: cross-entropy of the text; mix: their mean.
    """
    if kind not in HEAL_LOSSES:
        raise UsageError(f"--heal-loss '{kind}' is not one of {', '.join(HEAL_LOSSES)}")
    if kind != "lm" and targets is None:
        raise ValueError(f"heal loss '{kind}' needs teacher targets")
    weights = {"kl": (1.0, 0.0), "lm": (0.0, 1.0), "mix": (0.5, 0.5)}[kind]

    def loss(model: nn.Module, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        input_ids = batch["input_ids"]  # [b, L]
        labels = batch["labels"][:, 1:]  # [b, L-1]: token t+1 at position t
        logits = BatchLogits(model, input_ids, batch["attention_mask"])
        device = input_ids.device
        if targets is not None and weights[0]:
            ids, values, tail = (t[rows].to(device) for t in (targets.ids, targets.logprobs, targets.log_tail))
        kl_weight, lm_weight = weights

        def part(chunk_logits: torch.Tensor, positions: slice) -> torch.Tensor:
            total = torch.zeros((), device=device)
            if kl_weight:
                total = total + kl_weight * coarse_kl(chunk_logits, ids[:, positions], values[:, positions],
                                                      tail[:, positions])
            if lm_weight:
                total = total + lm_weight * torch.nn.functional.cross_entropy(
                    chunk_logits.flatten(0, 1), labels[:, positions].flatten(), ignore_index=-100, reduction="sum")
            return total

        count = labels.numel()
        return logits.chunk_sum(part, stop=labels.shape[1]) / count

    return loss


def healable_parameters(model: nn.Module, scope: str) -> dict[str, nn.Parameter]:
    """The parameters healing trains: every parameter of the factored modules (scope `factors`), or
    every parameter of the model (`all`: norms, embeddings and matrices left dense too)."""
    if scope == "all":
        return dict(model.named_parameters())
    chosen: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, FACTORED_TYPES):
            for name, param in module.named_parameters(prefix=path):
                chosen[name] = param
    if not chosen:
        raise UsageError("the model holds no factored layers (LowRankLinear / DictionaryLinear ...): healing trains "
                         "a compressed model's factors; compress it first (subspace compress)")
    return chosen


def freeze_all_but(model: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
    keep = {id(p) for p in trainable.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def sparsity_patterns(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each dictionary layer's atom positions (a copy): healing must leave them as they are."""
    return {path: module.atom_indices().detach().clone() for path, module in model.named_modules()
            if isinstance(module, DictionaryLinear)}


def rows_as_batches(input_ids: torch.Tensor) -> TokenBatchSet:
    """Full token windows [N, L] as training rows: every token is real and carries loss."""
    return TokenBatchSet(input_ids=input_ids, labels=input_ids.clone(), attention_mask=torch.ones_like(input_ids))


HEAL_FLAGS = data.SampleFlags("--heal-data", "--heal-samples", "--heal-seqlen")


def heal_sample_count(options: HealOptions, steps: int) -> int:
    """Rows to sample: --heal-samples, else one per sequence trained on (each seen once)."""
    return options.heal_samples or steps * options.heal_batch_size


def heal_rows(options: HealOptions, sources: list[str], teacher: nn.Module, tokenizer, steps: int, seed: int,
              device) -> torch.Tensor:
    """[N, heal_seqlen] healing rows from the first 95% of each source (`self`: sampled from the teacher).
    Seeded apart from calibration (seed + 1000), so healing sees windows calibration did not."""
    check_seqlen(teacher, options.heal_seqlen, "--heal-seqlen")
    return mixed_rows(sources, teacher, tokenizer, heal_sample_count(options, steps), options.heal_seqlen,
                      seed + 1000, device, HEAL_FLAGS)


@dataclass
class HealOutcome:
    """What one healing run did, for the report."""

    result: TrainResult
    trainable: int  # parameters trained
    params_before: int  # the model's parameters before and after: healing never changes them
    params_after: int
    patterns_checked: int  # dictionary layers whose atom positions were compared before and after


def heal_model(model: nn.Module, rows: torch.Tensor, targets: TeacherTargets | None, options: HealOptions,
               steps: int, eval_windows: torch.Tensor | None, settings: dict) -> HealOutcome:
    """Train `model`'s healable parameters on `rows` with the --heal-loss, in place.

    `settings` holds the trainer options healing does not fix itself (checkpoint_dir, resume,
    save_every, eval_every, eval_rows, fingerprint, seed). Raises RuntimeFailure when healing changed a
    parameter count or a sparsity pattern (a bug, never silent).
    """
    trainable = healable_parameters(model, options.heal_scope)
    freeze_all_but(model, trainable)
    params_before = param_count(model)
    patterns = sparsity_patterns(model)
    train_settings = TrainSettings(
        steps=steps, lr=options.heal_lr, weight_decay=0.0, warmup_steps=max(1, steps // 10),
        batch_size=options.heal_batch_size, grad_accum=1, max_grad_norm=1.0, precision="fp32",
        gradient_checkpointing=False, **settings)
    eval_rows = rows_as_batches(eval_windows if eval_windows is not None else rows[:1])
    try:
        result = train(model, rows_as_batches(rows), eval_rows, train_settings, heal_loss_fn(targets, options.heal_loss))
    finally:
        for param in model.parameters():
            param.requires_grad_(False)
    params_after = param_count(model)
    changed = [path for path, before in sparsity_patterns(model).items() if not torch.equal(before, patterns[path])]
    if params_after != params_before or changed or set(patterns) != set(sparsity_patterns(model)):
        raise RuntimeFailure("heal", f"healing changed the model's structure (parameters {params_before} -> "
                             f"{params_after}; sparsity patterns changed: {changed[:3]})")
    return HealOutcome(result, sum(p.numel() for p in trainable.values()), params_before, params_after, len(patterns))


def perplexities(model: nn.Module, eval_sets: list, batch_size: int, device, processes=None) -> dict[str, dict]:
    """{source: perplexity()} over each held-out set."""
    return {s.name: perplexity(model, s.windows, batch_size=batch_size, device=device, processes=processes)
            for s in eval_sets}


def healing_report(options: HealOptions, teacher: str, sources: list[str], rows: torch.Tensor, outcome: HealOutcome,
                   dense: dict, compressed: dict, healed: dict) -> HealingReport:
    result = outcome.result
    return HealingReport(
        teacher=teacher, loss=options.heal_loss, data=sources, rows=int(rows.shape[0]), seqlen=int(rows.shape[1]),
        steps=len(result.curve), lr=options.heal_lr, seconds=result.seconds, tokens=result.tokens,
        trainable_params=outcome.trainable, params_before=outcome.params_before, params_after=outcome.params_after,
        dictionary_patterns_kept=outcome.patterns_checked, resumed_from=result.resumed_from,
        perplexity={name: {"dense": dense[name]["ppl"], "compressed": compressed[name]["ppl"],
                           "healed": healed[name]["ppl"]} for name in healed},
        curve=result.curve, evals=result.evals)
