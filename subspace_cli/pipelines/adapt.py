"""The adapt verb: load -> data -> attach adapters -> train -> export a PEFT adapter -> report.

The trained model is never written as is: each method's updates are exported as exact LoRA
pairs, the training model is dropped, and a fresh untouched base is wrapped by PEFT with those
pairs (so at most one full model is held at a time), then saved with PEFT's own writer.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.evaluate.perplexity import check_seqlen, is_causal_lm
from subspace_cli.io.output_dir import check_not_an_input, check_output_dir, check_writable_dir
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.io.training_data import load_training_data
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.adapt.experts import param_wrapper
from subspace_cli.methods.catalog import get_method, methods_for
from subspace_cli.modules.checkpoint import param_count, write_checkpoint
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.pipelines.adapt_config import TRAIN_FIELDS, AdaptConfig
from subspace_cli.pipelines.adapter_export import attach_exported
from subspace_cli.pipelines.config_paths import input_refs
from subspace_cli.pipelines.distributed import current_processes
from subspace_cli.pipelines.lifecycle import measured, report_fields, write_output
from subspace_cli.pipelines.trainer import TrainSettings, check_checkpoint, eval_loss, train
from subspace_cli.report.plots import plot_curve
from subspace_cli.report.resources import StageTimer
from subspace_cli.report.schema import AdapterLayerReport, PerplexityReport, Report, TrainingReport
from subspace_cli.walk import (ExpertStack, block_expert_stacks, block_linears, block_routers, compile_pattern,
                               find_blocks, weight_matrix)

log = logging.getLogger(__name__)

# Options that do not change what is trained: a checkpoint stays valid across them.
_NOT_IN_FINGERPRINT = {"out", "overwrite", "resume", "save_every", "checkpoint_dir", "eval_every", "eval_rows",
                       "merge", "shard_size"}


def validate(config: AdaptConfig):
    """Everything checkable before loading weights, so bad input fails fast with exit 2."""
    method = get_method("adapt", config.method)
    method_config = method.make_config(config.options)
    compile_pattern(config.targets, "--targets")
    compile_pattern(config.exclude, "--exclude")
    check_output_dir(Path(config.out), config.overwrite, input_refs(config))
    shard_size_bytes(config.shard_size)
    # Training checkpoints live outside --out (which is replaced as a whole) and away from the model and
    # data; --resume may well point inside them.
    reads = [ref for ref in input_refs(config) if ref[0] != "--resume"]
    check_not_an_input(checkpoint_dir(config), [*reads, ("output directory --out", Path(config.out))], "--checkpoint-dir")
    if config.save_every:
        check_writable_dir(checkpoint_dir(config), "--checkpoint-dir")
    if config.resume is not None:
        check_checkpoint(Path(config.resume))
    return method, method_config


def checkpoint_dir(config: AdaptConfig) -> Path:
    return Path(config.checkpoint_dir or f"{config.out}.checkpoints")


def select_layers(model: nn.Module, config: AdaptConfig, notes: list[str] | None = None
                  ) -> dict[str, nn.Module | ExpertStack]:
    """The targeted Linear layers and expert stacks (3-D parameters, e.g. mlp.experts.gate_up_proj
    [E, 2I, H]) of the repeated blocks; the rank must fit every one of them (each expert's matrix).

    Routers (Linears beside the experts, such as Qwen2-MoE's shared_expert_gate [1, H]) are left out
    unless --targets names them: a low-rank update of a routing gate is not what a default run means.
    Whatever the model holds and the run leaves out (routers, experts excluded by --targets / --exclude)
    is said in `notes`, the report's.
    """
    blocks = find_blocks(model)
    available: dict[str, nn.Module | ExpertStack] = {}
    layers: dict[str, nn.Module | ExpertStack] = {}
    routers: set[str] = set()
    for i, block in enumerate(blocks.modules):
        prefix = blocks.block_path(i)
        available.update(block_linears(block, prefix) | block_expert_stacks(block, prefix))
        layers.update(block_linears(block, prefix, config.targets, config.exclude))
        layers.update(block_expert_stacks(block, prefix, config.targets, config.exclude))
        routers.update(block_routers(block, prefix))
    skipped_routers = sorted(path for path in routers if path in layers and config.targets is None)
    for path in skipped_routers:
        del layers[path]
    if not layers:
        names = sorted({path.split(".", blocks.path.count(".") + 2)[-1] for path in available})
        raise UsageError(f"--targets '{config.targets}' / --exclude '{config.exclude}' matched no layer; the blocks "
                         f"{blocks.path}.N hold: {', '.join(names)}")
    for path, module in layers.items():
        out_f, in_f = module.slice_shape if isinstance(module, ExpertStack) else weight_matrix(module).shape
        if config.rank > min(out_f, in_f):
            what = "each expert of" if isinstance(module, ExpertStack) else "of"
            raise UsageError(f"--rank {config.rank} exceeds min(out, in) = {min(out_f, in_f)} {what} {path} "
                             f"[{out_f}×{in_f}]; pass a smaller --rank or --exclude that layer")
    if notes is not None:
        if skipped_routers:
            notes.append(f"routers are not adapted by default ({_listed(skipped_routers)}); name them in --targets "
                         "to adapt them")
        stacks = [path for path, m in available.items() if isinstance(m, ExpertStack)]
        left_out = [path for path in stacks if path not in layers]
        if left_out:
            notes.append(f"{len(left_out)} of {len(stacks)} expert stacks (3-D parameters) are not adapted: "
                         f"--targets / --exclude leave out {_listed(left_out)}")
    return layers


def _listed(paths: list[str], shown: int = 3) -> str:
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def check_experts(method, layers: dict, config: AdaptConfig) -> None:
    """Exit 2 when the run targets expert stacks and the method cannot adapt them (never a silent skip)."""
    stacks = [path for path, m in layers.items() if isinstance(m, ExpertStack)]
    if stacks and not method.adapts_experts:
        shape = "×".join(map(str, layers[stacks[0]].shape))
        more = f" and {len(stacks) - 1} more" if len(stacks) > 1 else ""
        able = " or ".join(f"--method {n}" for n, m in methods_for("adapt").items() if m.adapts_experts)
        raise UsageError(f"method '{config.method}' adapts Linear layers; experts are 3-D parameters ({stacks[0]} "
                         f"[{shape}]{more}): use {able}, or --exclude experts")


def _target_shape(module: nn.Module | ExpertStack) -> tuple[int, ...]:
    return module.shape if isinstance(module, ExpertStack) else tuple(weight_matrix(module).shape)


def _trainable_per_layer(model: nn.Module, layers: dict, trainable: dict[str, torch.Tensor]) -> dict[str, int]:
    """Trainable parameters of each target's adapter: a Linear's by name, an expert stack's in its
    PEFT ParamWrapper (nested wrappers share the module's path, so names cannot tell them apart)."""
    counts = {}
    for path, module in layers.items():
        if isinstance(module, ExpertStack):
            wrapper = param_wrapper(model.base_model.model, path)
            counts[path] = sum(p.numel() for d in (wrapper.lora_A, wrapper.lora_B) for p in d.parameters()
                               if p.requires_grad)
        else:
            counts[path] = sum(p.numel() for n, p in trainable.items() if f"{path}." in n)
    return counts


def fingerprint(config: AdaptConfig, lr: float) -> str:
    values = config.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT)
    values["lr"] = lr
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _calibration_runner(data, samples: int):
    """For data-aware inits (CorDA): run the model on the first `samples` training rows, one per
    call (PEFT's CorDA hooks read one sequence per forward)."""

    @torch.no_grad()
    def run(model: nn.Module) -> None:
        device = next(model.parameters()).device
        for row in range(min(samples, len(data))):
            model(input_ids=data.input_ids[row:row + 1].to(device),
                  attention_mask=data.attention_mask[row:row + 1].to(device))

    return run


def run_adapt(config: AdaptConfig) -> Report:
    method, method_config = validate(config)
    lr = config.lr if config.lr is not None else method.default_lr
    timer = StageTimer()
    with timer.stage("load"):
        loaded = load_model_and_tokenizer(config.model, device=config.device, dtype=config.dtype,
                                          allow_pickle=config.allow_pickle)
    model, tokenizer, base_path = loaded.model, loaded.tokenizer, loaded.path
    del loaded
    if not is_causal_lm(model):
        raise UsageError(f"adapt trains causal language models; '{config.model}' is a {type(model).__name__}")
    check_seqlen(model, config.seqlen, "--seqlen")
    with timer.stage("data"):
        data = load_training_data(config.data, tokenizer, seqlen=config.seqlen, packing=config.packing,
                                  format=config.format, seed=config.seed)
    layer_notes: list[str] = []
    layers = select_layers(model, config, layer_notes)
    check_experts(method, layers, config)
    total_params = param_count(model)
    with timer.stage("eval_before"):
        loss_before = eval_loss(model, data.eval, config.batch_size, config.eval_rows)
    generator = torch.Generator().manual_seed(config.seed)
    runner = _calibration_runner(data.train, method.calibration_samples(method_config))
    with timer.stage("init"):
        adapted = method.attach(model, layers, config.rank, config.scaling_alpha, method_config,
                               AdaptContext(generator=generator, run_calibration=runner))
    trainable = {n: p for n, p in adapted.model.named_parameters() if p.requires_grad}
    per_layer = _trainable_per_layer(adapted.model, layers, trainable)
    checkpoints = checkpoint_dir(config)
    settings = TrainSettings(
        **config.model_dump(include=set(TRAIN_FIELDS) - {"lr"}), lr=lr, checkpoint_dir=checkpoints,
        resume=Path(config.resume) if config.resume else None, fingerprint=fingerprint(config, lr))
    with timer.stage("train"):
        result = train(adapted.model, data.train, data.eval, settings)
    with timer.stage("export"):
        deltas = adapted.deltas()
        use_dora = adapted.use_dora
        notes = list(data.notes) + layer_notes + list(adapted.notes)
        del adapted, model
        gc.collect()
    loss_after = result.evals[-1]["loss"]
    report = Report(
        **report_fields("adapt", config, method_config),
        perplexity={"held-out": PerplexityReport(
            before=math.exp(loss_before), after=math.exp(loss_after), ratio=math.exp(loss_after - loss_before),
            n_tokens=int((data.eval.labels[:config.eval_rows or len(data.eval), 1:] != -100).sum()))},
        training=TrainingReport(
            trainable_params=sum(p.numel() for p in trainable.values()), total_params=total_params,
            steps=config.steps, tokens=result.tokens, lr=lr, seconds=result.seconds, data_format=data.format,
            train_rows=len(data.train), eval_rows=len(data.eval), resumed_from=result.resumed_from,
            curve=result.curve, evals=result.evals),
        adapters=[AdapterLayerReport(name=path, shape=_target_shape(layers[path]),
                                     trainable=per_layer[path], export_rank=d.rank) for path, d in deltas.items()],
        notes=notes)
    del layers, trainable
    # Under `accelerate launch` / `torchrun` the trainer opened the process group; one process writes.
    write_output("adapt", config, lambda tmp: _write(tmp, config, report, deltas, use_dora, base_path, result, timer,
                                                     checkpoints), current_processes(config.device))
    return report


def _write(tmp: Path, config: AdaptConfig, report: Report, deltas, use_dora: bool, base_path: Path, result,
           timer: StageTimer, checkpoint_dir: Path) -> Report:
    with timer.stage("write"):
        base = load_model_and_tokenizer(config.model, device=config.device, dtype=config.dtype,
                                        allow_pickle=config.allow_pickle, with_tokenizer=False).model
        # A hub id is recorded as such (portable); a local model as its absolute path.
        hub_id = not config.model.startswith("builtin:") and not Path(config.model).expanduser().exists()
        peft_model = attach_exported(base, deltas, use_dora, config.model if hub_id else str(base_path))
        peft_model.save_pretrained(tmp)
        plot_curve(result.curve, result.evals, tmp / "training_curve.png", f"{config.method} on {config.model}")
        report.output = {"path": str(Path(config.out).resolve()), "adapter": "PEFT LoRA" + (" (DoRA)" if use_dora else ""),
                         "plot": "training_curve.png"}
        if config.merge:
            merged = peft_model.merge_and_unload()
            write_checkpoint(merged, tmp / "merged", source_dir=base_path, max_shard_size=shard_size_bytes(config.shard_size))
            report.output["merged"] = "merged"
        if config.save_every:
            report.output["checkpoints"] = str(checkpoint_dir)
    return measured(report, timer)
