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

from subspace_cli import __version__
from subspace_cli.errors import UsageError
from subspace_cli.io.checkpoint import COPIED_FILES
from subspace_cli.io.devices import check_device
from subspace_cli.io.lazy_checkpoint import compare_layouts
from subspace_cli.io.lora_checkpoint import LoraCheckpoint
from subspace_cli.io.models import load_tokenizer
from subspace_cli.io.output_dir import atomic_output_dir, check_output_dir
from subspace_cli.io.planned_writer import PlannedShardWriter, TensorSpec
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.methods.merge.base import TensorInputs, merged_sparsity, task_vector_stats
from subspace_cli.methods.registry import get_method
from subspace_cli.pipelines.config_paths import input_refs, stored_recipe
from subspace_cli.pipelines.merge_config import MergeConfig
from subspace_cli.pipelines.merge_inputs import (
    input_labels, model_dir, check_vocabularies, eval_windows, open_inputs, require_finite, task_batches,
)
from subspace_cli.pipelines.progress import progress_bar
from subspace_cli.report.render import write_outputs
from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb
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
    if "base" in method.needs and config.base is None:
        raise UsageError(f"--method {config.method} needs the base model the inputs were fine-tuned from; pass --base")
    weights = _per_model(config.weights, len(config.models), "--weights", 1.0)
    densities = _per_model(config.density, len(config.models), "--density", 1.0)
    if getattr(method_config, "normalize", False) and config.method == "linear" and sum(weights) == 0:
        raise UsageError(f"--weights {','.join(f'{w:g}' for w in weights)} sum to 0 and linear divides by their sum; "
                         "change the weights or pass -O normalize=false")
    for value in densities:
        if not 0.0 < value <= 1.0:
            raise UsageError(f"--density {value:g} is outside (0, 1]; it is the fraction of each task vector kept")
    if config.method == "concrete" and len(config.data) != len(config.models):
        raise UsageError(f"--method concrete trains its mask on unlabeled text of each task: pass --data once per "
                         f"model, in model order ({len(config.models)} models, {len(config.data)} --data)")
    for pair in config.eval:
        task, sep, source = pair.partition("=")
        if not sep or not task or not source:
            raise UsageError(f"--eval '{pair}' is not TASK=SOURCE (e.g. kjv=builtin:kjv)")
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
                merged = method.build(TensorInputs(
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


# ----------------------------------------------------------------------------- concrete


def concrete_merge(config: MergeConfig, method_config, base, inputs, weights, timer: StageTimer):
    """Train the shared mask on the base model in memory; returns (merged targeted tensors, densities, losses, notes)."""
    from subspace_cli.io.models import load_model_and_tokenizer
    from subspace_cli.methods.merge.concrete import fit_concrete_mask, select_targets

    with timer.stage("load"):
        loaded = load_model_and_tokenizer(str(model_dir(base)), dtype="float32", device=config.device,
                                          allow_pickle=config.allow_pickle)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise UsageError(f"base '{config.base}' has no tokenizer files; concrete needs them to read --data")
    with timer.stage("data"):
        batches = task_batches(config, tokenizer)
    names = select_targets(model, method_config.targets)
    stored = stored_names(model, names, base)
    task_vectors = {}
    for name in names:
        theta0 = _read_finite(base, stored[name], config.base)
        task_vectors[name] = [w * (_read_finite(checkpoint, stored[name], label) - theta0)
                              for checkpoint, w, label in zip(inputs, weights, input_labels(config.models))]
    with timer.stage("mask"), progress_bar("training the concrete mask", total=method_config.steps) as advance:
        result = fit_concrete_mask(model, task_vectors, batches, method_config,
                                   torch.Generator().manual_seed(config.seed), progress=lambda step, loss: advance())
    notes = [f"concrete: the mask of {name} kept nothing; the tensor stays at the base" for name in result.dropped]
    del model, loaded, task_vectors
    merged = {stored[name]: tensor for name, tensor in result.merged.items()}
    density = {stored[name]: value for name, value in result.density.items()}
    return merged, density, result.losses, notes


def stored_names(model, names: list[str], checkpoint) -> dict[str, str]:
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


# ----------------------------------------------------------------------------- evaluation


def _load_for_eval(checkpoint, config: MergeConfig):
    from subspace_cli.io.models import load_model_and_tokenizer

    if isinstance(checkpoint, LoraCheckpoint):
        from peft import PeftModel

        base = load_model_and_tokenizer(str(checkpoint.base.path), with_tokenizer=False, device=config.device,
                                        allow_pickle=config.allow_pickle).model
        return PeftModel.from_pretrained(base, str(checkpoint.adapter_dir)).merge_and_unload().eval()
    return load_model_and_tokenizer(str(model_dir(checkpoint)), with_tokenizer=False, device=config.device,
                                    allow_pickle=config.allow_pickle).model.eval()


def evaluate_merge(config: MergeConfig, merged_dir: Path, base, inputs, labels: list[str], merge: MergeReport,
                   notes: list[str], windows: dict[str, torch.Tensor]) -> None:
    """Held-out perplexity per task of the merge, the base and every input; normalised to the specialists.
    `windows`: each task's token windows (merge_inputs.eval_windows, read before the merge)."""
    import gc

    from subspace_cli.evaluate.perplexity import is_causal_lm, perplexity

    tasks = [pair.partition("=")[::2] for pair in config.eval]
    candidates = [("merged", None)] + ([("base", base)] if base is not None else []) + list(zip(labels, inputs))
    table: dict[str, dict[str, float]] = {task: {} for task, _ in tasks}
    with progress_bar("evaluating models", total=len(candidates) * len(tasks)) as advance:
        for label, checkpoint in candidates:
            from subspace_cli.io.models import load_model_and_tokenizer

            model = (load_model_and_tokenizer(str(merged_dir), with_tokenizer=False, device=config.device).model.eval()
                     if checkpoint is None else _load_for_eval(checkpoint, config))
            if not is_causal_lm(model):
                notes.append(f"perplexity skipped: {type(model).__name__} is not a causal language model")
                return
            for task, _ in tasks:
                table[task][label] = perplexity(model, windows[task], batch_size=config.batch_size)["ppl"]
                advance()
            del model
            gc.collect()
    merge.perplexity = table
    if len(tasks) == len(labels):
        merge.specialists = {task: label for (task, _), label in zip(tasks, labels)}
        merge.normalised = {
            label: sum(table[task][label] / table[task][merge.specialists[task]] for task, _ in tasks) / len(tasks)
            for label in table[tasks[0][0]]}


def plot_mask_density(merge: MergeReport, path: Path) -> None:
    """Mask density per targeted tensor, in checkpoint order (concrete)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in merge.tensors if t.mask_density is not None]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.08), 3.5))
    ax.bar(range(len(rows)), [t.mask_density for t in rows], width=1.0)
    ax.set_xlabel("targeted tensor (checkpoint order)")
    ax.set_ylabel("mask density")
    ax.set_ylim(0, 1)
    ax.set_title("concrete mask density per tensor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
            windows = eval_windows(config, load_tokenizer(model_dir(reference))) if config.eval else {}
        merge = MergeReport(base=config.base, models=list(config.models), weights=weights, densities=densities)
        replaced = density = None
        if config.method == "concrete":
            replaced, density, merge.mask_losses, concrete_notes = concrete_merge(
                config, method_config, base, inputs, weights, timer)
            notes += concrete_notes
            # Tensors outside the mask merge by task arithmetic with the same λ (an all-ones mask there).
            method = get_method("merge", "task-arithmetic")
            method_config = method.make_config({"lambda": method_config.lambda_})
        out = Path(config.out)
        with atomic_output_dir(out, config.overwrite, input_refs(config)) as tmp:
            layout = output_layout(config, reference)
            with timer.stage("merge"), PlannedShardWriter(tmp, shard_size_bytes(config.shard_size), layout) as writer:
                merge.tensors = stream_merge(config, method, method_config, base, inputs, weights, densities, writer,
                                             replaced, density)
                shards = writer.finish()
            _write_config(model_dir(reference), tmp, config)
            if config.method == "concrete":
                plot_mask_density(merge, tmp / "mask_density.png")
            if config.eval:
                with timer.stage("evaluate"):
                    evaluate_merge(config, tmp, base, inputs, labels, merge, notes, windows)
            report = Report(
                tool_version=__version__, verb="merge", model=config.base or config.models[0], method=config.method,
                options=config.options, merge=merge, timings_s=timer.seconds, peak_rss_mb=round(peak_rss_mb(), 1),
                peak_device_mb=peak_device_mb(), notes=notes,
                output={"path": str(out), "shards": shards.get("shards"), "bytes": shards.get("total_bytes")})
            write_outputs(tmp, report, stored_recipe("merge", config))
    return report
