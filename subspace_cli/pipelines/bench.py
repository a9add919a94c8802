"""The bench verb: inference speed and memory of one or more models, side by side.

For each model: prefill latency of one prompt, batch-1 decode ms per token (greedy, with the KV
cache), decode tokens per second at each batch size, resident weight bytes. Rounds are interleaved
across the models (round 1: A, B, C; round 2: A, B, C; ...) so that machine noise hits all of them
alike, and each figure is the best round. The first model is the baseline of every ratio.

At batch-1 decode every weight is read once per token, so the speed-up a smaller model can reach
is bounded by the ratio of bytes read: the memory-bound ceiling, baseline weight bytes / model
weight bytes (1 / (1 − γ) for a compressed fraction γ of the weights). The report puts it beside
the measured decode speed-up.
"""

from __future__ import annotations

import gc
import inspect
import time
from typing import Annotated

from pydantic import Field, field_validator

from subspace_cli.errors import UsageError
from subspace_cli.pipelines.compress_config import RunOptions
from subspace_cli.pipelines.config_paths import MODEL


class BenchConfig(RunOptions):
    models: Annotated[list[str], MODEL] = Field(
        description="models to measure (local directories, cached hub ids, builtin:NAME); the first is the baseline")
    prompt_len: int = Field(128, ge=1, description="prompt tokens of the prefill measurement")
    decode_tokens: int = Field(32, ge=1, description="tokens generated per decode measurement")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8],
                                   description="decode batch sizes (tokens per second at each); 1 is always measured")
    rounds: int = Field(3, ge=1, description="measurement rounds, interleaved across the models; the best is reported")

    @field_validator("models", "batch_sizes", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, (str, int)):
            value = [value]
        return [part.strip() if isinstance(part, str) else part
                for item in value for part in (str(item).split(",") if isinstance(item, str) else [item])
                if not isinstance(part, str) or part.strip()]

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError("batch sizes must be ≥ 1")
        return sorted({1, *value})


def validate(config: BenchConfig) -> None:
    """What holds before any model exists (a recipe step may bench models an earlier step writes)."""
    if not config.models:
        raise UsageError("bench needs at least one model")


def resolve_models(config: BenchConfig) -> None:
    """The device exists and every reference names a local directory: exit 2 before the first model loads."""
    from subspace_cli.io.devices import check_device
    from subspace_cli.io.models import resolve_model_path

    check_device(config.device)
    for ref in config.models:
        resolve_model_path(ref)


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (a DictionaryLinear's codes are buffers)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def inference_cache_bytes(model) -> int:
    """Bytes the model keeps beside its weights in faster inference forms (a DictionaryLinear's
    cached S or W, chosen at its first call without gradients)."""
    return sum(m.cache_bytes() for m in model.modules() if callable(getattr(m, "cache_bytes", None)))


def dictionary_forms(model) -> dict[str, int]:
    """How many DictionaryLinear layers run in each inference form ({} without any)."""
    forms: dict[str, int] = {}
    for m in model.modules():
        if callable(getattr(m, "chosen_form", None)):
            forms[m.chosen_form()] = forms.get(m.chosen_form(), 0) + 1
    return forms


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _decode(model, prefilled, steps: int, cache_kwarg: str) -> None:
    """`steps` greedy tokens after a prefill, one token per forward with the KV cache."""
    past, logits = _cache_of(prefilled), prefilled.logits
    for _ in range(steps):
        step = logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
        result = model(input_ids=step, use_cache=True, **{cache_kwarg: past})
        past, logits = _cache_of(result), result.logits


def measure_round(model, prompt_len: int, decode_tokens: int, batch_sizes: list[int], seed: int) -> dict:
    """One round on one model: prefill seconds (batch 1), and per batch size the decode seconds of
    `decode_tokens` greedy steps after a prefill (cache on)."""
    import torch

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    # Prefill projects only the last position to the vocabulary, as generation does.
    accepts = inspect.signature(model.forward).parameters
    last_logits = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    cache_kwarg = "cache" if "cache" in accepts else "past_key_values"  # transformers renamed it (5.x)
    generator = torch.Generator().manual_seed(seed)
    out = {"decode_s": {}}
    with torch.inference_mode():
        for batch in batch_sizes:
            ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)  # [b, L]
            prefilled = []
            seconds = _timed(lambda: prefilled.append(model(input_ids=ids, use_cache=True, **last_logits)), device)
            if batch == 1:
                out["prefill_s"] = seconds
            out["decode_s"][batch] = _timed(lambda: _decode(model, prefilled[0], decode_tokens, cache_kwarg), device)
    return out


def run_bench(config: BenchConfig) -> dict:
    import torch

    from subspace_cli.evaluate.perplexity import is_causal_lm
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.pipelines.progress import progress_bar
    from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb

    validate(config)
    resolve_models(config)
    timer = StageTimer()
    models = []
    with timer.stage("load"):
        for ref in config.models:
            model = load_model_and_tokenizer(ref, device=config.device, dtype=config.dtype,
                                             allow_pickle=config.allow_pickle, with_tokenizer=False).model
            if not is_causal_lm(model):
                raise UsageError(f"model '{ref}' is a {type(model).__name__}, not a causal language model; bench "
                                 "measures prefill and decode")
            positions = getattr(model.config, "max_position_embeddings", None)
            if positions and config.prompt_len + config.decode_tokens > positions:
                raise UsageError(f"--prompt-len {config.prompt_len} + --decode-tokens {config.decode_tokens} exceeds "
                                 f"model '{ref}''s {positions} positions")
            models.append(model.eval())
    torch.manual_seed(config.seed)
    best: list[dict] = [{} for _ in models]
    with timer.stage("measure"), progress_bar("benchmarking", total=config.rounds * len(models)) as advance:
        for model in models:  # warm-up: first-call allocations and kernel selection stay out of the rounds
            measure_round(model, min(config.prompt_len, 8), 1, [1], config.seed)
        for r in range(config.rounds):
            for i, model in enumerate(models):
                result = measure_round(model, config.prompt_len, config.decode_tokens, config.batch_sizes,
                                       config.seed + r)
                _keep_best(best[i], result)
                gc.collect()
                advance()
    rows = [_row(ref, model, b, config) for ref, model, b in zip(config.models, models, best)]
    for row in rows:
        _ratios(row, rows[0])
    return {
        "ok": True, "verb": "bench", "device": str(next(models[0].parameters()).device), "dtype": config.dtype,
        "prompt_len": config.prompt_len, "decode_tokens": config.decode_tokens, "rounds": config.rounds,
        "threads": torch.get_num_threads(), "models": rows, "timings_s": timer.seconds,
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_device_mb": peak_device_mb(),
        "note": "best of the rounds, interleaved across the models; ratios against the first model; "
                "ceiling = baseline weight bytes / model weight bytes (batch-1 decode reads every weight once "
                "per token); cache = inference forms kept beside the weights (dictionary layers); peak memory "
                "is the whole process's, all models loaded",
    }


def _keep_best(best: dict, result: dict) -> None:
    best["prefill_s"] = min(best.get("prefill_s", float("inf")), result["prefill_s"])
    decode = best.setdefault("decode_s", {})
    for batch, seconds in result["decode_s"].items():
        decode[batch] = min(decode.get(batch, float("inf")), seconds)


def _row(ref: str, model, best: dict, config: BenchConfig) -> dict:
    steps = config.decode_tokens
    return {
        "model": ref,
        "weight_bytes": weight_bytes(model),
        "cache_bytes": inference_cache_bytes(model),
        "dictionary_forms": dictionary_forms(model),
        "params": sum(p.numel() for p in model.parameters()),
        "prefill_ms": best["prefill_s"] * 1e3,
        "decode_ms_per_token": best["decode_s"][1] / steps * 1e3,
        "tokens_per_s": {str(batch): batch * steps / seconds for batch, seconds in best["decode_s"].items()},
    }


def _ratios(row: dict, baseline: dict) -> None:
    """Speed-ups against the baseline (> 1: faster), and the memory-bound decode ceiling."""
    row["weight_ratio"] = row["weight_bytes"] / baseline["weight_bytes"]
    row["prefill_speedup"] = baseline["prefill_ms"] / row["prefill_ms"]
    row["decode_speedup"] = baseline["decode_ms_per_token"] / row["decode_ms_per_token"]
    row["decode_ceiling"] = baseline["weight_bytes"] / row["weight_bytes"]
    row["throughput_speedup"] = {batch: tps / baseline["tokens_per_s"][batch] for batch, tps in row["tokens_per_s"].items()}
