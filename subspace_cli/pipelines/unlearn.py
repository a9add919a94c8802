"""The unlearn verb: load -> forget / retain data -> score before -> train the targeted weights -> score after -> write.

Only the weights a method targets can change: every other parameter is frozen, and the report
lists each tensor that differs from the input checkpoint (read back lazily, one tensor at a
time) with its relative Frobenius change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from subspace_cli.errors import RuntimeFailure, UsageError
from subspace_cli.evaluate.membership import membership_auc
from subspace_cli.evaluate.perplexity import check_seqlen, is_causal_lm, perplexity
from subspace_cli.evaluate.samples import add_samples
from subspace_cli.io import data as text_data
from subspace_cli.io.output_dir import check_output_dir
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.methods.catalog import get_method
from subspace_cli.methods.unlearn.base import UnlearnData
from subspace_cli.modules.checkpoint import write_checkpoint
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.pipelines.config_paths import input_refs
from subspace_cli.pipelines.distributed import Processes, current_processes
from subspace_cli.pipelines.lifecycle import measured, report_fields, write_output
from subspace_cli.pipelines.progress import progress_bar
from subspace_cli.pipelines.task_checks import TaskTable, check_task_names
from subspace_cli.pipelines.unlearn_config import UnlearnConfig
from subspace_cli.report.resources import StageTimer
from subspace_cli.report.schema import ChangedTensor, PerplexityReport, Report, UnlearnReport

log = logging.getLogger(__name__)


def validate(config: UnlearnConfig):
    """Everything checkable before loading weights, so bad input fails fast with exit 2."""
    method = get_method("unlearn", config.method)
    method_config = method.make_config(config.options)
    if config.forget == config.retain:
        log.warning("--forget and --retain are the same source")
        raise UsageError(f"--forget and --retain are both '{config.forget}': there is nothing to keep apart; "
                         "pass different data")
    check_task_names(config.tasks)
    check_output_dir(Path(config.out), config.overwrite, input_refs(config))
    shard_size_bytes(config.shard_size)
    return method, method_config


def _read(spec: str, flag: str) -> str:
    text = text_data.load_text(spec, flag)
    if not text.strip():
        raise UsageError(f"{flag} '{spec}' is empty: the {flag.removeprefix('--')} set has no text")
    return text


def _held_out_name(spec: str, explicit: str | None, role: str) -> str:
    return f"--eval-{role} '{explicit}'" if explicit else f"the held-out 5% of --{role} '{spec}' (or pass --eval-{role})"


class _Sets:
    """Training rows, held-out perplexity windows and membership windows of both sets."""

    def __init__(self, config: UnlearnConfig, tokenizer):
        forget_text, retain_text = _read(config.forget, "--forget"), _read(config.retain, "--retain")
        if forget_text == retain_text:
            log.warning("--forget and --retain hold the same text")
            raise UsageError("--forget and --retain hold the same text: there is nothing to keep apart; pass different data")
        forget_pool, forget_held = text_data.split_holdout(forget_text)
        retain_pool, retain_held = text_data.split_holdout(retain_text)
        if config.eval_forget:
            forget_held = _read(config.eval_forget, "--eval-forget")
        if config.eval_retain:
            retain_held = _read(config.eval_retain, "--eval-retain")
        self.train = UnlearnData(
            forget=text_data.sample_calibration(
                tokenizer, forget_pool, config.forget_samples, config.seqlen, config.seed,
                text_data.SampleFlags("--forget", "--forget-samples", "--seqlen"), config.forget),
            retain=text_data.sample_calibration(
                tokenizer, retain_pool, config.retain_samples, config.seqlen, config.seed + 1,
                text_data.SampleFlags("--retain", "--retain-samples", "--seqlen"), config.retain))
        self.heldout = {"forget": forget_held, "retain": retain_held}  # texts of the task checks
        self.forget_eval = text_data.eval_windows(tokenizer, forget_held, config.eval_seqlen, config.eval_chars,
                                                  what=_held_out_name(config.forget, config.eval_forget, "forget"))
        self.retain_eval = text_data.eval_windows(tokenizer, retain_held, config.eval_seqlen, config.eval_chars,
                                                  what=_held_out_name(config.retain, config.eval_retain, "retain"))
        # Non-members for the membership test: windows of the same forget pool that no training row
        # touches, cut like the training rows, BOS included where the tokenizer adds one (the held-out
        # tail is other text: other books of the KJV).
        self.nonmembers = text_data.nonmember_windows(tokenizer, forget_pool, config.forget_samples, config.seqlen,
                                                      member_seed=config.seed, seed=config.seed + 2)
        self.nonmember_source = "forget pool"
        if self.nonmembers.shape[0] == 0:  # the training rows cover the whole pool: fall back to held-out text
            self.nonmembers = text_data.eval_windows(tokenizer, forget_held, config.seqlen, None)[: config.forget_samples]
            self.nonmember_source = "held-out forget text"


def _scores(model, sets: _Sets, config: UnlearnConfig) -> dict[str, float]:
    return {"forget": perplexity(model, sets.forget_eval, batch_size=config.batch_size)["ppl"],
            "retain": perplexity(model, sets.retain_eval, batch_size=config.batch_size)["ppl"],
            "mia": membership_auc(model, sets.train.forget, sets.nonmembers, config.batch_size)}


def _rows(step: int, n_rows: int, batch: int, generator_seed: int) -> torch.Tensor:
    """Row indices of one step: consecutive slices of a seeded permutation per pass over the rows."""
    per_pass = max(n_rows // batch, 1)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(generator_seed + step // per_pass))
    start = (step % per_pass) * batch
    return order[start:start + batch]


def train_plan(plan, method_config, data: UnlearnData, seed: int, processes: Processes = Processes()
               ) -> list[dict[str, float]]:
    """AdamW over plan.params. Under `torchrun` / `accelerate launch --multi_gpu` each of the P processes
    takes every P-th row of the step's batch and the gradients are averaged, so P processes take the
    same steps as one (to float reassociation): the batch size must divide evenly."""
    world, rank = processes.world, processes.rank
    if method_config.batch_size % world:
        raise UsageError(f"-O batch_size={method_config.batch_size} must be a multiple of the {world} processes: "
                         "each takes an equal share of every step's rows")
    optimizer = torch.optim.AdamW(plan.params, lr=method_config.lr, weight_decay=0.0)
    curve = []
    with progress_bar("unlearning", total=method_config.steps) as advance:
        for step in range(method_config.steps):
            forget_rows = _rows(step, data.forget.shape[0], method_config.batch_size, seed)[rank::world]
            retain_rows = _rows(step, data.retain.shape[0], method_config.batch_size, seed + 10**6)[rank::world]
            loss, parts = plan.loss(forget_rows, retain_rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            values = torch.tensor([loss.item(), *parts.values()], dtype=torch.float64)  # [1 + parts]
            if processes.distributed:
                for param in plan.params:  # the mean gradient over the processes' equal shares
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    processes.sum_(param.grad).div_(world)
                values = processes.sum_(values) / world
            if not math.isfinite(values[0]):
                raise RuntimeFailure("unlearn", f"the loss became {float(values[0])} at step {step + 1}; lower -O lr")
            optimizer.step()
            curve.append({"step": step + 1, "loss": float(values[0]),
                          **{k: float(v) for k, v in zip(parts, values[1:])}})
            advance()
    optimizer.zero_grad(set_to_none=True)
    return curve


def stored_layout(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (model names) under the names and layout a checkpoint stores them in: transformers renames
    some tensors on load (Mixtral's block_sparse_moe.gate -> mlp.gate) and fuses others (per-expert w1 / w3 /
    w2 into mlp.experts.gate_up_proj [E, 2I, H]); its own reverse conversion, which save_pretrained applies,
    undoes both."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors) if tensors else {}


def changed_tensors(model, source_dir: Path, allow_pickle: bool = False) -> tuple[list[ChangedTensor], int, list[str]]:
    """Tensors of the model that differ from the input checkpoint, read back one at a time, by their stored
    names (a tensor the model renames or fuses on load is compared in the checkpoint's own layout)."""
    from subspace_cli.io.lazy_checkpoint import LazyCheckpoint

    changed, unchanged, unknown = [], 0, []
    with LazyCheckpoint(source_dir, allow_pickle=allow_pickle) as original:
        state = model.state_dict()
        stored = {name: tensor for name, tensor in state.items() if name in original}
        converted = stored_layout(model, {name: t for name, t in state.items() if name not in original})
        stored.update({name: t for name, t in converted.items() if name in original})
        unknown = [name for name in converted if name not in original]  # tied weights or buffers the file lacks
        for name, tensor in stored.items():
            before = original.get(name).to(tensor.dtype)
            if torch.equal(before, tensor.cpu()):
                unchanged += 1
                continue
            norm = float(before.double().norm())
            change = float((tensor.cpu().double() - before.double()).norm())
            changed.append(ChangedTensor(name=name, rel_change=change / norm if norm else math.inf))
    return changed, unchanged, unknown


def run_unlearn(config: UnlearnConfig) -> Report:
    method, method_config = validate(config)
    processes = current_processes(config.device)
    timer = StageTimer()
    notes: list[str] = []
    with timer.stage("load"):
        loaded = load_model_and_tokenizer(config.model, device=processes.device(config.device), dtype=config.dtype,
                                          allow_pickle=config.allow_pickle)
    model, tokenizer = loaded.model, loaded.tokenizer
    if not is_causal_lm(model):
        raise UsageError(f"{type(model).__name__} is not a causal language model; unlearning needs next-token losses")
    if tokenizer is None:
        raise UsageError(f"model '{config.model}' has no tokenizer files; copy them into its directory")
    check_seqlen(model, config.seqlen, "--seqlen")
    check_seqlen(model, config.eval_seqlen, "--eval-seqlen")
    with timer.stage("data"):
        sets = _Sets(config, tokenizer)
    notes.append(f"membership AUC: {sets.train.forget.shape[0]} forget rows against {sets.nonmembers.shape[0]} "
                 f"windows of the {sets.nonmember_source} that no training row touches")
    tasks = TaskTable(config, sets.heldout, {"forget": _held_out_name(config.forget, config.eval_forget, "forget"),
                                             "retain": _held_out_name(config.retain, config.eval_retain, "retain")})
    with timer.stage("eval_before"):
        before = _scores(model, sets, config)
        samples = add_samples([], "before", model, tokenizer, processes.device(config.device))
        tasks.add("before", model, tokenizer, processes.device(config.device))
    with timer.stage("prepare"):
        plan = method.plan(model, sets.train, method_config, torch.Generator().manual_seed(config.seed))
    notes.extend(plan.notes)  # e.g. what the block-layout probe found (methods/unlearn/architecture.py)
    model.train(False)  # no dropout: the steps are deterministic
    with timer.stage("unlearn"):
        curve = train_plan(plan, method_config, sets.train, config.seed, processes)
        plan.finish()
    if processes.distributed:
        notes.append(f"trained on {processes.world} processes, each taking every {processes.world}th row of a batch")
    for p in model.parameters():
        p.requires_grad_(False)
    with timer.stage("eval_after"):
        after = _scores(model, sets, config)
        add_samples(samples, "after", model, tokenizer, processes.device(config.device))
        tasks.add("after", model, tokenizer, processes.device(config.device))
    with timer.stage("diff"):
        changed, unchanged, unknown = changed_tensors(model, loaded.path, config.allow_pickle)
    state = model.state_dict()
    targeted = set(plan.targeted) | set(stored_layout(model, {n: state[n] for n in plan.targeted if n in state}))
    stray = sorted({c.name for c in changed} - targeted)
    if stray:
        raise RuntimeFailure("diff", f"tensors outside the method's targets changed: {stray[:5]}")
    if unknown:
        notes.append(f"{len(unknown)} tensors are not stored in the input checkpoint (tied or derived): {unknown[:3]}")
    diagnostics = {k: v for k, v in plan.diagnostics.items() if not isinstance(v, torch.Tensor)}
    out = Path(config.out)
    report = Report(
        **report_fields("unlearn", config, method_config),
        perplexity={name: PerplexityReport(before=before[name], after=after[name], ratio=after[name] / before[name],
                                           n_tokens=int(windows.numel()))
                    for name, windows in (("forget", sets.forget_eval), ("retain", sets.retain_eval))},
        unlearn=UnlearnReport(layer=int(plan.diagnostics["layer"]), targeted=plan.targeted, changed=changed,
                              unchanged=unchanged, mia_auc_before=before["mia"], mia_auc_after=after["mia"],
                              losses=curve, diagnostics=diagnostics),
        notes=notes, output={"path": str(out)}, tasks=tasks.table, samples=samples)
    def write(tmp: Path) -> Report:
        with timer.stage("write"):
            write_checkpoint(model, tmp, source_dir=loaded.path, max_shard_size=shard_size_bytes(config.shard_size))
        return measured(report, timer)

    write_output("unlearn", config, write, processes)  # the main process writes; the others wait in it
    return measured(report, timer)
