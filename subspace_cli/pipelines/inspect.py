"""The inspect verb: spectra and effective ranks of every Linear/Conv1D in the repeated blocks.

Per matrix W [out, in]: effective rank (Roy & Vetterli 2007), the ranks that keep 90% / 99%
of the Frobenius energy, and the break-even rank ⌈in·out / (in + out)⌉ below which a low-rank
pair stores fewer parameters than W. With calibration data the same on the whitened spectrum,
the singular values of W·L with L Lᵀ = G the input Gram (what SVD-LLM truncates): a matrix
whose whitened rank is far below its plain rank is compressible on that data.

Matrices are processed one at a time (one float32 copy of one weight); only the spectra are
kept, for the plot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from pydantic import Field

from subspace_cli.errors import UsageError
from subspace_cli.pipelines.compress_config import RunOptions
from subspace_cli.pipelines.config_paths import DATA, MODEL, OUTPUT
from subspace_cli.report.plots import plot_spectra

log = logging.getLogger(__name__)

ENERGY_FRACTIONS = (0.9, 0.99)
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


class InspectConfig(RunOptions):
    model: Annotated[str, MODEL] = Field(description="model: local directory, cached hub id, or builtin:smollm2-135m / builtin:minilm-l6")
    calib: Annotated[str | None, DATA] = Field(
        None, description="calibration data for whitened spectra: text file, directory of .txt, .jsonl with 'text', "
        "builtin:shakespeare or builtin:kjv (windows come from its first 95%)")
    calib_samples: int = Field(32, ge=1, description="number of calibration sequences (with --calib)")
    calib_seqlen: int = Field(256, ge=2, description="tokens per calibration sequence (with --calib)")
    targets: str | None = Field(None, description="regex: only layers whose dotted path matches")
    exclude: str | None = Field(None, description="regex: skip layers whose dotted path matches")
    plot: Annotated[str | None, OUTPUT] = Field(None, description="write a PNG of the normalised spectra (σ_i/σ_1) to this path")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass (with --calib)")


def validate(config: InspectConfig) -> None:
    """Everything checkable before loading weights (exit 2)."""
    from subspace_cli.walk import compile_pattern

    compile_pattern(config.targets, "--targets")
    compile_pattern(config.exclude, "--exclude")
    if config.plot is not None and not config.plot.strip():
        raise UsageError("--plot is empty; pass a file name such as spectra.png")
    if config.plot:
        parent = Path(config.plot).expanduser().resolve().parent
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--plot '{config.plot}': '{parent}' is a file, not a directory")
        if not parent.is_dir():
            raise UsageError(f"--plot '{config.plot}': directory '{parent}' does not exist; create it first")
        if Path(config.plot).is_dir():
            raise UsageError(f"--plot '{config.plot}' is a directory; pass a file name such as spectra.png")
        if Path(config.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise UsageError(f"--plot '{config.plot}': unsupported image type; valid suffixes: {', '.join(PLOT_SUFFIXES)}")
        from subspace_cli.io.output_dir import check_not_an_input, probe_writable

        check_not_an_input(Path(config.plot), [("model", config.model), *([("--calib", config.calib)] if config.calib else [])],
                           "--plot")
        probe_writable(parent, Path(config.plot), "--plot")


def spectrum_summary(s, prefix: str = "") -> dict:
    """Effective rank and energy ranks of one spectrum, keys prefixed (e.g. "whitened_")."""
    from subspace_cli.linalg.spectra import effective_rank, rank_for_energy

    row = {f"{prefix}effective_rank": round(effective_rank(s), 3)}
    for fraction in ENERGY_FRACTIONS:
        row[f"{prefix}rank_{round(fraction * 100)}"] = rank_for_energy(s, fraction)
    return row


def _calibration_grams(config: InspectConfig, loaded, timer) -> dict:
    from subspace_cli.evaluate.perplexity import check_seqlen
    from subspace_cli.io.data import resolve_calibration
    from subspace_cli.pipelines.calibration import collect_dense_grams

    if loaded.tokenizer is None:
        raise UsageError(f"model '{config.model}' has no tokenizer files; --calib needs one to tokenize the data")
    with timer.stage("calibration"):
        data = resolve_calibration(config.calib, loaded.tokenizer, config.calib_samples, config.calib_seqlen, config.seed)
        check_seqlen(loaded.model, data.input_ids.shape[1], "--calib-seqlen")
        return collect_dense_grams(
            loaded.model, data.input_ids, targets=config.targets, exclude=config.exclude,
            device=config.device, batch_size=config.batch_size,
        )


def _inspect_matrices(config: InspectConfig, model, grams: dict | None, spectra: dict) -> list[dict]:
    import torch

    from subspace_cli.linalg.rank_allocation import MatrixSpec
    from subspace_cli.linalg.spectra import normalised_spectrum, singular_values
    from subspace_cli.linalg.whitening import cholesky_whitener
    from subspace_cli.pipelines.progress import progress_bar
    from subspace_cli.walk import block_linears, find_blocks, weight_matrix

    blocks = find_blocks(model)
    rows = []
    with progress_bar("spectra", total=len(blocks)) as advance, torch.no_grad():
        for i, block in enumerate(blocks.modules):
            prefix = blocks.block_path(i)
            for name, module in block_linears(block, prefix, config.targets, config.exclude).items():
                weight = weight_matrix(module).detach().to(torch.float32)  # [out, in], one copy
                out_f, in_f = weight.shape
                spec = MatrixSpec(name, in_f, out_f)
                s = singular_values(weight)  # [min(out, in)], descending
                row = {
                    "name": name, "kind": name[len(prefix) + 1:], "block": i, "shape": [out_f, in_f],
                    "params": spec.dense_params, "max_rank": min(out_f, in_f), "break_even_rank": spec.break_even,
                    "sigma_max": float(s[0]) if s.numel() else 0.0,
                    **spectrum_summary(s),
                }
                spectra.setdefault("plain", []).append((row["kind"], normalised_spectrum(s).cpu().numpy()))
                if grams is not None and name in grams:
                    whitener = cholesky_whitener(grams[name].covariance)  # [in, in] float64
                    sw = singular_values(weight.to(torch.float64) @ whitener)  # σ(W·L)
                    row.update(spectrum_summary(sw, prefix="whitened_"))
                    spectra.setdefault("whitened", []).append((row["kind"], normalised_spectrum(sw).cpu().numpy()))
                rows.append(row)
                del weight
            advance()
    if not rows:
        raise UsageError(
            f"no Linear layers matched (--targets {config.targets!r}, --exclude {config.exclude!r}); "
            "loosen the regexes (paths look like "
            f"'{blocks.block_path(0)}.<layer>')"
        )
    return rows


def summarise(rows: list[dict], prefix: str = "") -> dict:
    """Averages over matrices of rank / max_rank, and the parameters a per-matrix truncation
    at each energy level would keep (a matrix at or above break-even stays dense)."""
    if not rows or f"{prefix}effective_rank" not in rows[0]:
        return {}
    n = len(rows)
    dense = sum(r["params"] for r in rows)
    out = {f"mean_{prefix}effective_rank_fraction": round(sum(r[f"{prefix}effective_rank"] / r["max_rank"] for r in rows) / n, 4)}
    for fraction in ENERGY_FRACTIONS:
        key = f"{prefix}rank_{round(fraction * 100)}"
        kept = sum(min(r["params"], r[key] * (r["shape"][0] + r["shape"][1])) for r in rows)
        out[f"mean_{key}_fraction"] = round(sum(r[key] / r["max_rank"] for r in rows) / n, 4)
        out[f"{prefix}below_break_even_{round(fraction * 100)}"] = sum(r[key] < r["break_even_rank"] for r in rows)
        out[f"{prefix}params_fraction_at_{round(fraction * 100)}"] = round(kept / dense, 4)
    return out


def run_inspect(config: InspectConfig) -> dict:
    """Load the model, compute every matrix's spectrum summary; JSON-ready dict."""
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb

    validate(config)
    timer = StageTimer()
    with timer.stage("load"):
        loaded = load_model_and_tokenizer(
            config.model, device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle,
            with_tokenizer=config.calib is not None,
        )
    grams = _calibration_grams(config, loaded, timer) if config.calib else None
    spectra: dict = {}
    with timer.stage("spectra"):
        rows = _inspect_matrices(config, loaded.model, grams, spectra)
    del grams
    if config.plot:
        with timer.stage("plot"):
            plot_spectra(config.plot, spectra)
        log.info("wrote %s", config.plot)
    summary = {"n_matrices": len(rows), "params": sum(r["params"] for r in rows), **summarise(rows), **summarise(rows, "whitened_")}
    return {
        "model": config.model,
        "architecture": type(loaded.model).__name__,
        "calibration": None if not config.calib else {
            "data": config.calib, "samples": config.calib_samples, "seqlen": config.calib_seqlen, "seed": config.seed,
        },
        "matrices": rows,
        "summary": summary,
        "plot": config.plot,
        "seconds": timer.seconds,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": peak_device_mb(),
    }
