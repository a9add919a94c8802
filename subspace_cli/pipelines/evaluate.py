"""The eval verb: perplexity on held-out text, drift against a baseline, quality gates.

The default split scores the last 5% of the data (io/data.split_holdout), which calibration
never samples from, so a compressed model is not scored on its own calibration text. Windows
are non-overlapping, `eval_seqlen` tokens each, over the first `eval_chars` characters.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import Field, field_validator

from subspace_cli.errors import UsageError
from subspace_cli.pipelines.compress_config import DEVICES_DESCRIPTION, RunOptions
from subspace_cli.pipelines.config_paths import DATA, MODEL
from subspace_cli.pipelines.task_options import TaskOptions

log = logging.getLogger(__name__)

FIELDS = ("ppl", "nll", "n_tokens")
BASELINE_FIELDS = ("baseline_ppl", "baseline_nll", "ppl_ratio", "kl", "embedding_similarity")


class EvalConfig(RunOptions, TaskOptions):
    model: Annotated[str, MODEL] = Field(description="model: local directory, cached hub id, or builtin:smollm2-135m / builtin:minilm-l6")
    data: Annotated[str, DATA] = Field(description="evaluation data: text file, directory of .txt, .jsonl with 'text', builtin:shakespeare or builtin:kjv")
    baseline: Annotated[str | None, MODEL] = Field(None, description="reference model for ppl_ratio and per-token KL (or embedding similarity for encoders)")
    eval_seqlen: int = Field(512, ge=2, description="tokens per perplexity window")
    eval_chars: int = Field(40000, ge=100, description="characters of the split scored (from its start)")
    split: Literal["heldout", "all"] = Field("heldout", description="heldout: the last 5% of the data (never used for calibration); all: the whole text")
    fail_if: list[str] = Field(default_factory=list, description="quality gate 'FIELD OP VALUE', e.g. 'ppl_ratio>1.5'; repeatable; exit 1 if any holds")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    devices: str | None = Field(None, description=DEVICES_DESCRIPTION)

    @field_validator("fail_if", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        # A recipe may write a single gate as a plain string; the CLI always passes a list.
        return [value] if isinstance(value, str) else value


def task_fields(tasks: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(gate fields of the tasks, those that need --baseline)."""
    return tuple(f"{t}.acc" for t in tasks), tuple(f"{t}.{f}" for t in tasks for f in ("baseline_acc", "acc_ratio"))


def validate(config: EvalConfig):
    """Gate syntax and fields, before any weights are loaded (exit 2)."""
    from subspace_cli.evaluate.gates import parse_conditions
    from subspace_cli.pipelines.task_checks import check_task_names

    own, relative = task_fields(check_task_names(config.tasks))
    conditions = parse_conditions(config.fail_if, FIELDS + BASELINE_FIELDS + own + relative)
    if config.baseline is None:
        for cond in conditions:
            if cond.field in BASELINE_FIELDS + relative:
                raise UsageError(f"--fail-if '{cond.text}': field '{cond.field}' needs --baseline; without it valid "
                                 f"fields: {', '.join(FIELDS + own)}")
    return conditions


def run_tasks(config: EvalConfig, loaded, baseline, text: str, device, what: str) -> dict[str, dict]:
    """{task: {acc, n, chance[, metric, baseline_acc, acc_ratio]}} for every --tasks name (lm-eval tasks
    also give `metric`, the lm-eval metric reported as acc)."""
    from subspace_cli.pipelines.task_checks import model_task_scores

    tokenizer = loaded.tokenizer if loaded.tokenizer is not None else baseline.tokenizer
    scores = [model_task_scores(m.model, tokenizer, config.tasks, text, config.task_examples, device, config.batch_size,
                                what) for m in [loaded] + ([baseline] if baseline is not None else [])]
    results = scores[0]
    if baseline is not None:
        for task, entry in results.items():
            entry["baseline_acc"] = scores[1][task]["acc"]
            entry["acc_ratio"] = entry["acc"] / entry["baseline_acc"] if entry["baseline_acc"] else float("nan")
    return results


def evaluation_text(config: EvalConfig) -> str:
    from subspace_cli.io.data import load_text, split_holdout, split_specs

    specs = split_specs(config.data, "--data")
    if len(specs) != 1:
        raise UsageError(f"--data '{config.data}' names {len(specs)} sources; eval scores one, run it once per source")
    text = load_text(specs[0], "--data")
    return split_holdout(text)[1] if config.split == "heldout" else text


def _load(ref: str, config: EvalConfig, with_tokenizer: bool = True):
    """(the model on `--device`, or loaded on the CPU and spread over `--devices`; where inputs go in)."""
    from subspace_cli.modules.loading import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(ref, device="cpu" if config.devices else config.device, dtype=config.dtype,
                                      allow_pickle=config.allow_pickle, with_tokenizer=with_tokenizer)
    if not config.devices:
        return loaded, config.device
    from subspace_cli.pipelines.placement import place_blocks

    placement = place_blocks(loaded.model, config.devices)
    log.info(placement.note())
    return loaded, placement.input_device


def _check_tokenizers(model_tok, base_tok, config: EvalConfig) -> None:
    if model_tok is None or base_tok is None:
        return
    if model_tok.get_vocab() != base_tok.get_vocab():
        raise UsageError(
            f"model '{config.model}' and baseline '{config.baseline}' have different tokenizers; "
            "drift is only defined between models that share one"
        )


def run_eval(config: EvalConfig) -> dict:
    """Score the model (and baseline) on the data; JSON-ready dict. GateFailed if a gate holds."""
    from subspace_cli.evaluate.drift import score_windows
    from subspace_cli.evaluate.gates import check_gates, raise_if_failed
    from subspace_cli.evaluate.perplexity import check_seqlen
    from subspace_cli.io.data import eval_windows
    from subspace_cli.pipelines.progress import progress_bar
    from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb

    conditions = validate(config)
    timer = StageTimer()
    with timer.stage("data"):
        text = evaluation_text(config)
    with timer.stage("load"):
        loaded, device = _load(config.model, config)
        baseline = _load(config.baseline, config)[0] if config.baseline else None  # placed the same way
    tokenizer = loaded.tokenizer if loaded.tokenizer is not None else (baseline.tokenizer if baseline else None)
    if tokenizer is None:
        raise UsageError(f"model '{config.model}' has no tokenizer files; copy them into its directory")
    if baseline is not None:
        _check_tokenizers(loaded.tokenizer, baseline.tokenizer, config)
    check_seqlen(loaded.model, config.eval_seqlen, "--eval-seqlen")
    what = f"the held-out 5% of --data '{config.data}' (or --split all for the whole text)" \
        if config.split == "heldout" else f"--data '{config.data}'"
    windows = eval_windows(tokenizer, text, config.eval_seqlen, max_chars=config.eval_chars, what=what)  # [n, L]

    with timer.stage("evaluate"), progress_bar("evaluating windows", total=windows.shape[0]) as advance:

        def progress(n_windows: int) -> None:
            for _ in range(n_windows):
                advance()

        scores = score_windows(
            loaded.model, windows, baseline=baseline.model if baseline else None, batch_size=config.batch_size,
            device=device, progress=progress,
        )
    result = {
        "model": config.model,
        "baseline": config.baseline,
        "data": config.data,
        "split": config.split,
        "eval_seqlen": int(windows.shape[1]),
        "n_windows": int(windows.shape[0]),
        **scores,
    }
    if scores["metric"] != "perplexity":
        result["note"] = (f"{type(loaded.model).__name__} has no language-model head: reported the mean per-token "
                          "cosine similarity of last hidden states to the baseline instead of perplexity")
        log.warning(result["note"])
    if config.tasks:
        with timer.stage("tasks"):
            result["tasks"] = run_tasks(config, loaded, baseline, text, device, what)
    flat = {**scores, **{f"{t}.{k}": v for t, entry in result.get("tasks", {}).items() for k, v in entry.items()}}
    gates = check_gates(conditions, flat)
    result["gates"] = [g.to_dict() for g in gates]
    result["ok"] = not any(g.failed for g in gates)
    result["seconds"] = timer.seconds
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["peak_device_mb"] = peak_device_mb()
    raise_if_failed(gates, summary=result)
    return result
