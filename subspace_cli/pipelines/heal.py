"""The heal verb: teacher targets -> train the compressed model's own parameters -> write -> report.

`subspace heal COMPRESSED --teacher DENSE` (pipelines/healing.py has the method). The teacher is
loaded first, scores perplexity (the "before compression" figure), makes its top-k targets on the
healing rows and is dropped; only then is the compressed model loaded, so one model is held at a
time. The output has the compressed checkpoint's format, layout and parameter count.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path

from subspace_cli.errors import UsageError
from subspace_cli.io.output_dir import check_not_an_input, check_output_dir, check_writable_dir
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.pipelines.config_paths import input_refs
from subspace_cli.pipelines.heal_config import HealConfig
from subspace_cli.pipelines.lifecycle import measured, report_fields, write_output

log = logging.getLogger(__name__)

# Options that do not change what is trained: a checkpoint stays valid across them.
_NOT_IN_FINGERPRINT = {"out", "overwrite", "resume", "save_every", "checkpoint_dir", "eval_every", "eval_rows", "eval",
                       "eval_seqlen", "eval_chars", "shard_size", "batch_size", "tasks", "task_examples"}


def compressed_recipe(model_ref: str) -> dict:
    """The compress options recorded in a local checkpoint's recipe.yaml ({} when there is none)."""
    path = Path(model_ref).expanduser() / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        log.info("ignoring unreadable %s: %s", path, err)
        return {}
    if not isinstance(recipe, dict) or recipe.get("verb") != "compress" or not isinstance(recipe.get("config"), dict):
        return {}
    return recipe["config"]


def resolved_sources(config: HealConfig) -> tuple[str, list[str]]:
    """(teacher, healing sources): the flags, else what MODEL/recipe.yaml says it was compressed from."""
    recorded = compressed_recipe(config.model)
    teacher = config.teacher or recorded.get("model")
    if not teacher:
        raise UsageError(f"no --teacher given and '{config.model}' has no recipe.yaml naming the model it was "
                         "compressed from; pass --teacher DENSE_MODEL")
    sources = config.heal_data or [s for s in recorded.get("calib") or [] if isinstance(s, str)] or ["builtin:shakespeare"]
    return str(teacher), sources


def checkpoint_dir(config: HealConfig) -> Path:
    return Path(config.checkpoint_dir or f"{config.out}.checkpoints")


def validate(config: HealConfig) -> None:
    """Everything checkable before loading weights, so bad input fails fast with exit 2. The model
    may not exist yet (a later step of a `subspace run` pipeline): what needs it waits for run_heal."""
    from subspace_cli.pipelines.task_checks import check_task_names
    from subspace_cli.pipelines.trainer import check_checkpoint

    shard_size_bytes(config.shard_size)
    check_task_names(config.tasks)
    refs = input_refs(config)
    if config.model.startswith("builtin:") or Path(config.model).expanduser().is_dir():
        refs.append(("--teacher", resolved_sources(config)[0]))
    check_output_dir(Path(config.out), config.overwrite, refs)
    reads = [ref for ref in refs if ref[0] != "--resume"]
    check_not_an_input(checkpoint_dir(config), [*reads, ("output directory --out", Path(config.out))], "--checkpoint-dir")
    if config.save_every:
        check_writable_dir(checkpoint_dir(config), "--checkpoint-dir")
    if config.resume is not None:
        check_checkpoint(Path(config.resume))


def check_compressed(config: HealConfig) -> tuple[str, list[str]]:
    """(teacher, healing sources) once the model exists; exit 2 unless it is a compressed checkpoint."""
    from subspace_cli.io.models import resolve_model_path

    student = json.loads((resolve_model_path(config.model) / "config.json").read_text(encoding="utf-8"))
    if not student.get("subspace"):
        raise UsageError(f"model '{config.model}' is not a compressed checkpoint (its config.json has no 'subspace' "
                         "layout): healing trains a compressed model's factors; compress it first, or use "
                         "`subspace compress MODEL --heal STEPS`")
    teacher, sources = resolved_sources(config)
    check_output_dir(Path(config.out), config.overwrite, [*input_refs(config), ("--teacher", teacher)])
    return teacher, sources


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int,
                          teacher: str, student: str) -> None:
    """Distillation compares next-token distributions: both must index the same tokens."""
    if teacher_vocab != student_vocab or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UsageError(f"--teacher '{teacher}' has a vocabulary of {teacher_vocab} tokens that differs from the "
                         f"compressed model '{student}' ({student_vocab}); pass the model it was compressed from")


def fingerprint(config: HealConfig, teacher: str, sources: list[str]) -> str:
    values = config.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT)
    values.update(teacher=teacher, heal_data=sources)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def run_heal(config: HealConfig):
    from subspace_cli.evaluate.chunked_logits import vocab_size
    from subspace_cli.evaluate.perplexity import is_causal_lm
    from subspace_cli.evaluate.samples import add_samples
    from subspace_cli.io.models import load_tokenizer, resolve_model_path
    from subspace_cli.modules.checkpoint import write_checkpoint
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.pipelines.datasets import evaluation_sets
    from subspace_cli.pipelines.distributed import current_processes
    from subspace_cli.pipelines.healing import heal_model, heal_rows, healing_report, perplexities, teacher_targets
    from subspace_cli.pipelines.task_checks import TaskTable
    from subspace_cli.report.plots import plot_curve
    from subspace_cli.report.resources import StageTimer
    from subspace_cli.report.schema import Report

    validate(config)
    teacher_ref, sources = check_compressed(config)
    timer = StageTimer()
    notes: list[str] = []
    student_path = resolve_model_path(config.model)
    student_tokenizer = load_tokenizer(student_path)
    with timer.stage("teacher"):
        loaded = load_model_and_tokenizer(teacher_ref, device=config.device, dtype=config.dtype,
                                          allow_pickle=config.allow_pickle)
        teacher = loaded.model
        if not is_causal_lm(teacher):
            raise UsageError(f"heal distils a causal language model; --teacher '{teacher_ref}' is a {type(teacher).__name__}")
        student_vocab = json.loads((student_path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        check_same_vocabulary(loaded.tokenizer, student_tokenizer, vocab_size(teacher), student_vocab or -1,
                              teacher_ref, config.model)
        eval_sets = evaluation_sets(_EvalView(config, sources), teacher, student_tokenizer, notes,
                                    default_flag="--heal-data")
        before = perplexities(teacher, eval_sets, config.batch_size, config.device)
        samples = add_samples([], "dense", teacher, student_tokenizer, config.device)
        task_table = TaskTable.of_sources(config, [s.name for s in eval_sets])
        task_table.add("dense", teacher, student_tokenizer, config.device)
        rows = heal_rows(config, sources, teacher, student_tokenizer, config.steps, config.seed, config.device)
        targets = None if config.heal_loss == "lm" else teacher_targets(teacher, rows, config.heal_top_k,
                                                                        config.batch_size, config.device)
        del teacher, loaded
        gc.collect()
    with timer.stage("load"):
        student = load_model_and_tokenizer(config.model, device=config.device, dtype=config.dtype,
                                           allow_pickle=config.allow_pickle, with_tokenizer=False).model
    with timer.stage("eval_before"):
        compressed = perplexities(student, eval_sets, config.batch_size, config.device)
        add_samples(samples, "compressed", student, student_tokenizer, config.device)
        task_table.add("compressed", student, student_tokenizer, config.device)
    with timer.stage("heal"):
        outcome = heal_model(student, rows, targets, config, config.steps,
                             eval_sets[0].windows[:config.eval_rows or None] if eval_sets else None,
                             {"checkpoint_dir": checkpoint_dir(config), "eval_every": config.eval_every,
                              "eval_rows": config.eval_rows, "save_every": config.save_every,
                              "resume": Path(config.resume) if config.resume else None,
                              "fingerprint": fingerprint(config, teacher_ref, sources), "seed": config.seed})
    with timer.stage("eval_after"):
        healed = perplexities(student, eval_sets, config.batch_size, config.device)
        add_samples(samples, "healed", student, student_tokenizer, config.device)
        task_table.add("healed", student, student_tokenizer, config.device)
    healing = healing_report(config, teacher_ref, sources, rows, outcome, before, compressed, healed)
    report = Report(**report_fields("heal", config, None), notes=notes, healing=healing, samples=samples,
                    tasks=task_table.table,
                    perplexity=healing.perplexity_report(compressed, healed))

    def write(tmp: Path):
        with timer.stage("write"):
            write_checkpoint(student, tmp, source_dir=student_path, max_shard_size=shard_size_bytes(config.shard_size))
            plot_curve(outcome.result.curve, outcome.result.evals, tmp / "training_curve.png",
                       f"healing {config.model}")
        report.output = {"path": str(Path(config.out).resolve()), "format": "factored", "plot": "training_curve.png"}
        if config.save_every:
            report.output["checkpoints"] = str(checkpoint_dir(config))
        return measured(report, timer)

    # Under `accelerate launch` / `torchrun` the trainer opened the process group; one process writes.
    return write_output("heal", config, write, current_processes(config.device)) or report


class _EvalView:
    """The eval-set options of a heal run, as pipelines/datasets.evaluation_sets reads them."""

    def __init__(self, config: HealConfig, sources: list[str]):
        self.eval, self.calib = config.eval, sources
        self.eval_seqlen, self.eval_chars = config.eval_seqlen, config.eval_chars
