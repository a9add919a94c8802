"""A small, deterministic trainer on accelerate: `accelerate launch` gives DDP unchanged.

AdamW over the trainable parameters, linear warmup then cosine decay, gradient accumulation and
clipping, fp32 or bf16 autocast, optional gradient checkpointing, held-out loss at intervals and
resumable checkpoints. Batches are a pure function of (seed, step, process): micro-batch m takes
the next `batch_size` rows of the concatenated per-epoch permutations, so a resumed run sees
exactly the rows the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from subspace_cli import lifecycle
from subspace_cli.errors import RuntimeFailure, UsageError
from subspace_cli.evaluate.chunked_logits import BatchLogits, causal_lm_loss
from subspace_cli.io.training_data import TokenBatchSet
from subspace_cli.pipelines.adapt_config import TrainOptions
from subspace_cli.pipelines.progress import progress_bar

log = logging.getLogger(__name__)


class TrainSettings(TrainOptions):
    """One run's training settings: adapt's TrainOptions with the learning rate resolved, plus where
    checkpoints go and what identifies the run."""

    lr: float = Field(gt=0)  # resolved: --lr or the method's default
    checkpoint_dir: Path | None = None
    resume: Path | None = None
    fingerprint: str = ""  # identifies the run's configuration; a checkpoint from another run is refused


@dataclass
class TrainResult:
    curve: list[dict] = field(default_factory=list)  # per step: step, loss, lr, grad_norm
    evals: list[dict] = field(default_factory=list)  # step, loss, ppl
    seconds: float = 0.0
    tokens: int = 0
    resumed_from: int | None = None


def batch_rows(step: int, micro: int, settings: TrainSettings, n_rows: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Row indices of one micro-batch: a slice of the seeded per-epoch permutations."""
    start = ((step * settings.grad_accum + micro) * world + rank) * settings.batch_size
    rows = []
    for position in range(start, start + settings.batch_size):
        epoch, offset = divmod(position, n_rows)
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        rows.append(int(torch.randperm(n_rows, generator=generator)[offset]))
    return torch.tensor(rows)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batch(data: TokenBatchSet, rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    return {"input_ids": data.input_ids[rows].to(device), "attention_mask": data.attention_mask[rows].to(device),
            "labels": data.labels[rows].to(device)}


@torch.no_grad()
def eval_loss(model: nn.Module, data: TokenBatchSet, batch_size: int, limit: int | None = None, autocast=nullcontext) -> float:
    """Token-weighted mean cross-entropy over the held-out rows (labels −100 carry no loss)."""
    was_training = model.training
    model.eval()
    n = len(data) if not limit else min(limit, len(data))  # limit None or 0: every row
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = _batch(data, torch.arange(start, min(n, start + batch_size)), device)
        labels = batch["labels"][:, 1:]  # token t predicts t+1
        with autocast():  # logits a chunk of positions at a time, never the batch's [b, L, V]
            logits = BatchLogits(model, batch["input_ids"], batch["attention_mask"])
            total += float(logits.loss_sum(labels, stop=labels.shape[1]))
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, result: TrainResult, settings: TrainSettings) -> Path:
    """Write step-N atomically: trainable tensors, optimizer and scheduler state, RNG, curve."""
    final = directory / f"step-{step:06d}"
    tmp = directory / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in _trainable(model).items()}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "state.pt")
    (tmp / "trainer.json").write_text(json.dumps({
        "step": step, "fingerprint": settings.fingerprint, "curve": result.curve, "evals": result.evals,
        "tokens": result.tokens, "seconds": result.seconds}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    lifecycle.keep("training checkpoints", directory)  # a failed or interrupted run leaves these, on purpose
    return final


def find_checkpoint(path: Path) -> Path:
    """A step-N folder, or the newest step-N inside a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--resume '{path}' does not exist; pass a step-N folder or the checkpoint directory")
    if (path / "trainer.json").is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / "trainer.json").is_file()) if path.is_dir() else []
    if not steps:
        raise UsageError(f"--resume '{path}' holds no training checkpoint (step-N folders with trainer.json)")
    return steps[-1]


_META_KEYS = ("step", "fingerprint", "curve", "evals", "tokens", "seconds")


def read_checkpoint(path: Path, mmap: bool = False) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(trainer.json, trainable tensors, optimizer/scheduler/RNG state) of a step-N folder; a missing,
    truncated or foreign file is exit 2 naming it (checked before the run starts, and again on resume)."""
    where = f"--resume '{path}'"
    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{where}: trainer.json is unreadable or corrupt ({err}); resume from another step-N "
                         "folder or start again") from None
    if not isinstance(meta, dict) or any(key not in meta for key in _META_KEYS):
        raise UsageError(f"{where}: trainer.json lacks {', '.join(_META_KEYS)}; it was not written by subspace adapt")
    try:
        tensors = load_file(path / "trainable.safetensors")
    except Exception as err:  # noqa: BLE001 - safetensors raises SafetensorError, OSError or ValueError: all exit 2
        raise UsageError(f"{where}: trainable.safetensors is unreadable or corrupt ({err}); resume from another "
                         "step-N folder or start again") from None
    try:
        state = torch.load(path / "state.pt", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, pickle errors: all exit 2
        reason = (str(err).splitlines() or [repr(err)])[0]
        raise UsageError(f"{where}: state.pt is unreadable or corrupt ({reason}); resume from another step-N folder "
                         "or start again") from None
    if not isinstance(state, dict) or any(key not in state for key in ("optimizer", "scheduler", "rng")):
        raise UsageError(f"{where}: state.pt lacks optimizer, scheduler or RNG state; it was not written by subspace adapt")
    return meta, tensors, state


def check_checkpoint(resume: Path) -> Path:
    """Validation before any work: the checkpoint --resume names exists and every file of it reads."""
    path = find_checkpoint(resume)
    read_checkpoint(path, mmap=True)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, settings: TrainSettings, result: TrainResult) -> int:
    meta, tensors, state = read_checkpoint(path)
    if meta["fingerprint"] != settings.fingerprint:
        raise UsageError(f"--resume '{path}' was written by a run with other options (model, method, data, rank, "
                         "steps, schedule or seed differ); resume with the options it was started with")
    params = _trainable(model)
    if set(tensors) != set(params):
        raise UsageError(f"--resume '{path}': its trainable tensors do not match this model's adapters")
    bad = next((name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()),
               None)
    if bad is not None:
        raise RuntimeFailure("resume", f"checkpoint '{path}' holds NaN or Inf in '{bad}': training had diverged "
                             "before it was saved; resume from an earlier step-N folder or start again with a lower --lr")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UsageError(f"--resume '{path}': its optimizer state does not fit this run ({err})") from None
    result.curve, result.evals = meta["curve"], meta["evals"]
    result.tokens, result.seconds = meta["tokens"], meta["seconds"]
    result.resumed_from = meta["step"]
    return meta["step"]


LossFn = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]  # (model, micro-batch, its row ids) -> mean loss


def lm_loss(model: nn.Module, batch: dict, rows: torch.Tensor) -> torch.Tensor:
    """model(**batch).loss, with each chunk's logits recomputed in backward."""
    return causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def train(model: nn.Module, train_data: TokenBatchSet, eval_data: TokenBatchSet, settings: TrainSettings,
          loss_fn: LossFn = lm_loss) -> TrainResult:
    """Train the parameters that require grad; `loss_fn` makes each micro-batch's loss (default: the
    text's next-token cross-entropy; healing passes its distillation loss, which reads the rows' ids)."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16" if settings.precision == "bf16" else "no",
                              cpu=next(model.parameters()).device.type == "cpu")
    if settings.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # Not prepared by accelerate: it would step the schedule once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, settings.warmup_steps, settings.steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    result = TrainResult()
    start = 0
    if settings.resume is not None:
        start = load_checkpoint(find_checkpoint(settings.resume), accelerator.unwrap_model(model), optimizer, scheduler,
                                settings, result)
    model.train()
    device = accelerator.device
    last_eval = result.evals[-1]["step"] if result.evals else None
    began = time.perf_counter() - result.seconds
    with progress_bar(f"training {settings.steps} steps", settings.steps - start) as advance:
        for step in range(start, settings.steps):
            loss_sum = 0.0
            for micro in range(settings.grad_accum):
                rows = batch_rows(step, micro, settings, len(train_data), accelerator.process_index, accelerator.num_processes)
                batch = _batch(train_data, rows, device)
                sync = micro == settings.grad_accum - 1
                with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                    loss = loss_fn(model, batch, rows) / settings.grad_accum
                accelerator.backward(loss)
                loss_sum += float(loss.detach())
                result.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not math.isfinite(loss_sum):
                raise RuntimeFailure("train", f"loss became {loss_sum} at step {step + 1}; lower --lr or use --precision fp32")
            grad_norm = (float(accelerator.clip_grad_norm_(params, settings.max_grad_norm))
                         if settings.max_grad_norm > 0 else float("nan"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.curve.append({"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm})
            done = step + 1
            if settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
                _evaluate(model, eval_data, settings, accelerator, result, done)
                last_eval = done
            result.seconds = time.perf_counter() - began
            if settings.save_every and done % settings.save_every == 0 and done < settings.steps \
                    and accelerator.is_main_process and settings.checkpoint_dir is not None:
                save_checkpoint(settings.checkpoint_dir, done, accelerator.unwrap_model(model), optimizer, scheduler,
                                result, settings)
            advance()
    if last_eval != settings.steps:
        _evaluate(model, eval_data, settings, accelerator, result, settings.steps)
    result.seconds = time.perf_counter() - began
    model.eval()
    return result


def _evaluate(model, eval_data, settings, accelerator, result: TrainResult, step: int) -> None:
    loss = eval_loss(accelerator.unwrap_model(model), eval_data, settings.batch_size, settings.eval_rows,
                     accelerator.autocast)
    result.evals.append({"step": step, "loss": loss, "ppl": math.exp(min(loss, 700.0))})
    log.info("step %d: held-out loss %.4f, perplexity %.2f", step, loss, result.evals[-1]["ppl"])
