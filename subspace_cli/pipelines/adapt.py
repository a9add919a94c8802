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

from subspace_cli import __version__
from subspace_cli.errors import UsageError
from subspace_cli.evaluate.perplexity import check_seqlen, is_causal_lm
from subspace_cli.io.checkpoint import param_count, write_checkpoint
from subspace_cli.io.discovery import block_linears, compile_pattern, find_blocks, weight_matrix
from subspace_cli.io.models import load_model_and_tokenizer
from subspace_cli.io.output_dir import atomic_output_dir, check_not_an_input, check_output_dir, check_writable_dir
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.io.training_data import load_training_data
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.registry import get_method
from subspace_cli.pipelines.adapt_config import AdaptConfig
from subspace_cli.pipelines.adapter_export import attach_exported, plot_curve
from subspace_cli.pipelines.config_paths import input_refs, stored_recipe
from subspace_cli.pipelines.trainer import TrainSettings, check_checkpoint, eval_loss, train
from subspace_cli.report.render import write_outputs
from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb
from subspace_cli.report.schema import AdapterLayerReport, PerplexityReport, Report, TrainingReport

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


def select_layers(model: nn.Module, config: AdaptConfig) -> dict[str, nn.Module]:
    """The targeted Linear layers of the repeated blocks; the rank must fit every one of them."""
    blocks = find_blocks(model)
    available: dict[str, nn.Module] = {}
    layers: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks.modules):
        available.update(block_linears(block, blocks.block_path(i)))
        layers.update(block_linears(block, blocks.block_path(i), config.targets, config.exclude))
    if not layers:
        names = sorted({path.split(".", blocks.path.count(".") + 2)[-1] for path in available})
        raise UsageError(f"--targets '{config.targets}' / --exclude '{config.exclude}' matched no layer; the blocks "
                         f"{blocks.path}.N hold: {', '.join(names)}")
    for path, module in layers.items():
        out_f, in_f = weight_matrix(module).shape
        if config.rank > min(out_f, in_f):
            raise UsageError(f"--rank {config.rank} exceeds min(out, in) = {min(out_f, in_f)} of {path} "
                             f"[{out_f}×{in_f}]; pass a smaller --rank or --exclude that layer")
    return layers


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
    lr = config.lr if config.lr is not None else (method.default_lr or 2e-4)
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
    layers = select_layers(model, config)
    total_params = param_count(model)
    with timer.stage("eval_before"):
        loss_before = eval_loss(model, data.eval, config.batch_size, config.eval_rows)
    generator = torch.Generator().manual_seed(config.seed)
    runner = _calibration_runner(data.train, getattr(method_config, "samples", 16))
    with timer.stage("init"):
        adapted = method.build(model, layers, config.rank, config.scaling_alpha, method_config,
                               AdaptContext(generator=generator, run_calibration=runner))
    trainable = {n: p for n, p in adapted.model.named_parameters() if p.requires_grad}
    per_layer = {path: sum(p.numel() for n, p in trainable.items() if f"{path}." in n) for path in layers}
    checkpoints = checkpoint_dir(config)
    settings = TrainSettings(
        steps=config.steps, lr=lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
        batch_size=config.batch_size, grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm,
        precision=config.precision, gradient_checkpointing=config.gradient_checkpointing,
        eval_every=config.eval_every, eval_rows=config.eval_rows, save_every=config.save_every,
        checkpoint_dir=checkpoints, resume=Path(config.resume) if config.resume else None, seed=config.seed,
        fingerprint=fingerprint(config, lr))
    with timer.stage("train"):
        result = train(adapted.model, data.train, data.eval, settings)
    with timer.stage("export"):
        deltas = adapted.deltas()
        use_dora = adapted.use_dora
        notes = list(data.notes) + list(adapted.notes)
        del adapted, model
        gc.collect()
    loss_after = result.evals[-1]["loss"]
    report = Report(
        tool_version=__version__, verb="adapt", model=config.model, method=config.method,
        options=config.model_dump(mode="json"),
        perplexity={"held-out": PerplexityReport(
            before=math.exp(loss_before), after=math.exp(loss_after), ratio=math.exp(loss_after - loss_before),
            n_tokens=int((data.eval.labels[:config.eval_rows or len(data.eval), 1:] != -100).sum()))},
        training=TrainingReport(
            trainable_params=sum(p.numel() for p in trainable.values()), total_params=total_params,
            steps=config.steps, tokens=result.tokens, lr=lr, seconds=result.seconds, data_format=data.format,
            train_rows=len(data.train), eval_rows=len(data.eval), resumed_from=result.resumed_from,
            curve=result.curve, evals=result.evals),
        adapters=[AdapterLayerReport(name=path, shape=tuple(weight_matrix(layers[path]).shape),
                                     trainable=per_layer[path], export_rank=d.rank) for path, d in deltas.items()],
        notes=notes)
    del layers, trainable
    from accelerate import PartialState

    process = PartialState()  # under `accelerate launch`, one process writes; the others wait for it
    if process.is_main_process:
        _write(config, report, deltas, use_dora, base_path, result, timer, checkpoints)
    process.wait_for_everyone()
    return report


def _write(config: AdaptConfig, report: Report, deltas, use_dora: bool, base_path: Path, result, timer: StageTimer,
           checkpoint_dir: Path) -> None:
    with atomic_output_dir(Path(config.out), config.overwrite, input_refs(config)) as tmp:
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
        report.timings_s = dict(timer.seconds)
        report.peak_rss_mb = peak_rss_mb()
        report.peak_device_mb = peak_device_mb()
        write_outputs(tmp, report, stored_recipe("adapt", config))
