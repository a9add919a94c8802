"""The merge verb: open inputs lazily -> check layouts -> merge tensor by tensor -> write shards -> report.

Every method but `concrete` streams: one tensor name at a time, the base and the N inputs are
read from their safetensors files (plain reads, no memory maps; pickle weights only with --allow-pickle,
memory-mapped), checked finite, merged in float32 and written
straight to the output shards (their layout is the base's, known before the first tensor), so peak
memory is about N + 2 tensors plus the method's working copies. `concrete` trains a mask over the targeted
tensors with the base model in memory (methods/merge/concrete.py), then streams the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from subspace_cli.errors import UsageError
from subspace_cli.evaluate.samples import add_samples
from subspace_cli.io.devices import check_device
from subspace_cli.io.lazy_checkpoint import compare_layouts
from subspace_cli.io.lora_checkpoint import LoraCheckpoint
from subspace_cli.io.models import load_tokenizer
from subspace_cli.io.output_dir import check_output_dir
from subspace_cli.io.planned_writer import PlannedShardWriter, TensorSpec
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.methods.catalog import get_method
from subspace_cli.methods.merge.base import (
    MergeContext,
    ModelMerge,
    PreparedMerge,
    TensorInputs,
    merged_sparsity,
    task_vector_stats,
)
from subspace_cli.methods.registry import Needs
from subspace_cli.modules.checkpoint import COPIED_FILES
from subspace_cli.pipelines.config_paths import input_refs
from subspace_cli.pipelines.lifecycle import measured, report_fields, write_output
from subspace_cli.pipelines.merge_config import MergeConfig
from subspace_cli.pipelines.merge_inputs import (
    check_vocabularies,
    eval_windows,
    heldout_texts,
    input_labels,
    model_dir,
    open_inputs,
    require_finite,
    task_batches,
)
from subspace_cli.pipelines.progress import progress_bar
from subspace_cli.pipelines.task_checks import TaskTable, check_task_names
from subspace_cli.report.plots import plot_mask_density
from subspace_cli.report.resources import StageTimer
from subspace_cli.report.schema import MergeReport, MergeTensorReport, Report

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- validation


def _per_model(values: list[float] | None, n: int, flag: str, default: float) -> list[float]:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{flag} has {len(values)} values for {n} models; give one value or one per model")
    return list(values)


def validate(config: MergeConfig):
    """Everything checkable before opening weights, so bad input fails fast with exit 2."""
    method = get_method("merge", config.method)
    method_config = method.make_config(config.options)
    if len(config.models) < 2:
        raise UsageError(f"merging needs at least two models, got {len(config.models)}: {', '.join(config.models) or 'none'}")
    if Needs.BASE in method.needs and config.base is None:
        raise UsageError(f"--method {config.method} needs the base model the inputs were fine-tuned from; pass --base")
    weights = _per_model(config.weights, len(config.models), "--weights", 1.0)
    densities = _per_model(config.density, len(config.models), "--density", 1.0)
    method.check(method_config, weights)
    for value in densities:
        if not 0.0 < value <= 1.0:
            raise UsageError(f"--density {value:g} is outside (0, 1]; it is the fraction of each task vector kept")
    if Needs.TASK_DATA in method.needs and len(config.data) != len(config.models):
        raise UsageError(f"--method {config.method} trains on unlabeled text of each task: pass --data once per "
                         f"model, in model order ({len(config.models)} models, {len(config.data)} --data)")
    for pair in config.eval:
        task, sep, source = pair.partition("=")
        if not sep or not task or not source:
            raise UsageError(f"--eval '{pair}' is not TASK=SOURCE (e.g. kjv=builtin:kjv)")
    check_task_names(config.tasks)
    if config.tasks and not config.eval:
        raise UsageError("--tasks are scored on the held-out text of each --eval TASK=SOURCE; pass --eval too")
    shard_size_bytes(config.shard_size)
    check_output_dir(Path(config.out), config.overwrite, input_refs(config))
    return method, method_config, weights, densities


# ----------------------------------------------------------------------------- streaming


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed independent of tensor order (DARE's drops depend only on seed and name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _out_dtype(config: MergeConfig, source_dtype: torch.dtype) -> torch.dtype:
    """--dtype for floating tensors; integer buffers (position ids, ...) keep theirs."""
    if config.dtype == "auto" or not source_dtype.is_floating_point:
        return source_dtype
    return getattr(torch, config.dtype)


def output_layout(config: MergeConfig, reference) -> list[TensorSpec]:
    """The merged checkpoint's tensors, from the reference's headers: written in this order."""
    return [TensorSpec(name, reference.shape(name), _out_dtype(config, reference.dtype(name)))
            for name in reference.names()]


def _record(name: str, merged: torch.Tensor, base: torch.Tensor | None, models: list[torch.Tensor],
            mask_density: float | None = None) -> MergeTensorReport:
    if base is None:  # no task vectors without a base (linear)
        return MergeTensorReport(name=name, shape=tuple(merged.shape), sparsity=0.0, sign_conflict=0.0)
    return MergeTensorReport(name=name, shape=tuple(merged.shape), sparsity=merged_sparsity(base, merged),
                             sign_conflict=task_vector_stats(base, models)["sign_conflict"], mask_density=mask_density)


def _read_finite(checkpoint, name: str, label: str) -> torch.Tensor:
    """One input tensor in float32, refused (exit 2) when it holds NaN or Inf: checked as stored, since
    the merge would otherwise fail later as a numerical error of its own (exit 3)."""
    tensor = checkpoint.get(name)
    require_finite(tensor, label, name)
    return tensor.float()


def stream_merge(config: MergeConfig, method, method_config, base, inputs, weights, densities, writer: PlannedShardWriter,
                 replaced: dict[str, torch.Tensor] | None = None, mask_density: dict[str, float] | None = None,
                 ) -> list[MergeTensorReport]:
    """Merge every tensor name of the reference checkpoint; `replaced` holds tensors merged already (concrete)."""
    reference = base if base is not None else inputs[0]
    names = reference.names()
    labels = input_labels(config.models)
    records = []
    with progress_bar("merging tensors", total=len(names)) as advance:
        for name in names:
            source_dtype = reference.dtype(name)
            if not source_dtype.is_floating_point:  # integer buffers (position ids, ...) are copied
                writer.add(name, reference.get(name))
                advance()
                continue
            base_t = _read_finite(base, name, config.base) if base is not None else None
            models = [_read_finite(checkpoint, name, label) for checkpoint, label in zip(inputs, labels)]
            if replaced is not None and name in replaced:
                merged = replaced[name]
            else:
                merged = method.merge(TensorInputs(
                    name=name, base=base_t, models=models, weights=weights, densities=densities,
                    generator=torch.Generator().manual_seed(_tensor_seed(config.seed, name))), method_config)
            if not torch.isfinite(merged).all():
                from subspace_cli.errors import RuntimeFailure

                raise RuntimeFailure("merge", f"tensor '{name}' merged to non-finite values; check the inputs and options")
            records.append(_record(name, merged, base_t, models, (mask_density or {}).get(name)))
            writer.add(name, merged.to(_out_dtype(config, source_dtype)))
            del base_t, models, merged
            advance()
    return records


def _write_config(reference_dir: Path, out: Path, config: MergeConfig) -> None:
    """config.json, tokenizer and generation config from the base (the first model without one)."""
    for name in ("config.json", *COPIED_FILES):
        if (reference_dir / name).is_file():
            shutil.copyfile(reference_dir / name, out / name)
    if config.dtype != "auto" and (out / "config.json").is_file():
        data = json.loads((out / "config.json").read_text())
        data["dtype" if "dtype" in data or "torch_dtype" not in data else "torch_dtype"] = config.dtype
        (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- model-level merges


def prepare_model_merge(config: MergeConfig, method: ModelMerge, method_config, base, inputs, weights,
                        timer: StageTimer) -> PreparedMerge:
    """Hand a ModelMerge the inputs before streaming (e.g. concrete trains its mask on the base in memory)."""
    from subspace_cli.modules.loading import load_model_and_tokenizer

    def load_base():
        loaded = load_model_and_tokenizer(str(model_dir(base)), dtype="float32", device=config.device,
                                          allow_pickle=config.allow_pickle)
        return loaded.model, loaded.tokenizer

    context = MergeContext(
        base=base, inputs=inputs, labels=input_labels(config.models), base_label=str(config.base), weights=weights,
        seed=config.seed, load_base=load_base, task_batches=lambda tokenizer: task_batches(config, tokenizer),
        read=_read_finite, stage=timer.stage, progress=progress_bar)
    return method.prepare(context, method_config)


# ----------------------------------------------------------------------------- evaluation


def _load_for_eval(checkpoint, config: MergeConfig):
    from subspace_cli.modules.loading import load_model_and_tokenizer

    if isinstance(checkpoint, LoraCheckpoint):
        from peft import PeftModel

        base = load_model_and_tokenizer(str(checkpoint.base.path), with_tokenizer=False, device=config.device,
                                        allow_pickle=config.allow_pickle).model
        return PeftModel.from_pretrained(base, str(checkpoint.adapter_dir)).merge_and_unload().eval()
    return load_model_and_tokenizer(str(model_dir(checkpoint)), with_tokenizer=False, device=config.device,
                                    allow_pickle=config.allow_pickle).model.eval()


def evaluate_merge(config: MergeConfig, merged_dir: Path, base, inputs, labels: list[str], merge: MergeReport,
                   notes: list[str], windows: dict[str, torch.Tensor], task_table: TaskTable | None = None,
                   tokenizer=None, samples: list[dict] | None = None) -> None:
    """Held-out perplexity per task of the merge, the base and every input; normalised to the specialists.
    `windows`: each task's token windows (merge_inputs.eval_windows, read before the merge). With --tasks,
    `task_table` gets each model's task accuracy on the same held-out texts."""
    import gc

    from subspace_cli.evaluate.perplexity import is_causal_lm, perplexity

    tasks = [pair.partition("=")[::2] for pair in config.eval]
    candidates = [("merged", None)] + ([("base", base)] if base is not None else []) + list(zip(labels, inputs))
    table: dict[str, dict[str, float]] = {task: {} for task, _ in tasks}
    with progress_bar("evaluating models", total=len(candidates) * len(tasks)) as advance:
        for label, checkpoint in candidates:
            from subspace_cli.modules.loading import load_model_and_tokenizer

            model = (load_model_and_tokenizer(str(merged_dir), with_tokenizer=False, device=config.device).model.eval()
                     if checkpoint is None else _load_for_eval(checkpoint, config))
            if not is_causal_lm(model):
                notes.append(f"perplexity skipped: {type(model).__name__} is not a causal language model")
                return
            for task, _ in tasks:
                table[task][label] = perplexity(model, windows[task], batch_size=config.batch_size)["ppl"]
                advance()
            if task_table is not None:
                task_table.add(label, model, tokenizer, config.device)
            if samples is not None:
                add_samples(samples, label, model, tokenizer, config.device)
            del model
            gc.collect()
    merge.perplexity = table
    if len(tasks) == len(labels):
        merge.specialists = {task: label for (task, _), label in zip(tasks, labels)}
        merge.normalised = {
            label: sum(table[task][label] / table[task][merge.specialists[task]] for task, _ in tasks) / len(tasks)
            for label in table[tasks[0][0]]}


# ----------------------------------------------------------------------------- the verb


def run_merge(config: MergeConfig) -> Report:
    method, method_config, weights, densities = validate(config)
    check_device(config.device)
    timer = StageTimer()
    notes: list[str] = []
    labels = input_labels(config.models)
    with contextlib.ExitStack() as stack:
        with timer.stage("open"):
            base, inputs = open_inputs(config, stack, notes)
            reference, reference_label = (base, f"the base '{config.base}'") if base is not None else (inputs[0], f"'{labels[0]}'")
            others = [(label, c) for label, c in zip(labels, inputs) if c is not reference]
            compare_layouts(reference, others, reference_label=reference_label)
            check_vocabularies(reference, reference_label, [c for _, c in others], [label for label, _ in others])
            # --eval text is read and tokenized now (the reference's tokenizer is the one the merge gets), so a
            # bad source fails before the merge rather than after it.
            tokenizer = load_tokenizer(model_dir(reference)) if config.eval else None
            texts = heldout_texts(config) if config.eval else {}
            windows = eval_windows(config, tokenizer, texts) if config.eval else {}
            samples: list[dict] = []  # greedy samples of every model, made with --eval
            task_table = TaskTable(config, texts if config.tasks else {},
                                   {task: f"the held-out 5% of --eval '{pair}'" for task, pair in zip(texts, config.eval)})
        merge = MergeReport(base=config.base, models=list(config.models), weights=weights, densities=densities)
        prepared = PreparedMerge(replaced={})
        if isinstance(method, ModelMerge):
            prepared = prepare_model_merge(config, method, method_config, base, inputs, weights, timer)
            merge.mask_losses = prepared.losses
            notes += prepared.notes
        def write(tmp: Path) -> Report:
            layout = output_layout(config, reference)
            with timer.stage("merge"), PlannedShardWriter(tmp, shard_size_bytes(config.shard_size), layout) as writer:
                merge.tensors = stream_merge(config, method, method_config, base, inputs, weights, densities, writer,
                                             prepared.replaced, prepared.mask_density)
                shards = writer.finish()
            _write_config(model_dir(reference), tmp, config)
            if prepared.mask_density:
                plot_mask_density(merge.tensors, tmp / "mask_density.png", title=f"{config.method} mask density per tensor")
            if config.eval:
                with timer.stage("evaluate"):
                    evaluate_merge(config, tmp, base, inputs, labels, merge, notes, windows, task_table, tokenizer,
                                   samples)
            report = Report(
                **report_fields("merge", config, method_config, model=config.base or config.models[0]), merge=merge,
                notes=notes, tasks=task_table.table, samples=samples, output={"path": str(config.out), "shards": shards.get("shards"),
                                     "bytes": shards.get("total_bytes")})
            return measured(report, timer)

        report = write_output("merge", config, write)
    return report
