"""`subspace bench MODEL [MODEL ...]`: prefill and decode speed and weight memory, side by side."""

from __future__ import annotations

from typing import List

import typer

from subspace_cli.cli.common import run_verb
from subspace_cli.cli.options import JsonFlag, QuietFlag, field_option
from subspace_cli.pipelines.bench import BenchConfig as C


def bench(
    models: List[str] = typer.Argument(..., help=C.model_fields["models"].description),
    prompt_len: int = field_option(C, "prompt_len"),
    decode_tokens: int = field_option(C, "decode_tokens"),
    batch_sizes: List[int] = field_option(C, "batch_sizes", "--batch-size"),
    rounds: int = field_option(C, "rounds"),
    device: str = field_option(C, "device"),
    dtype: str = field_option(C, "dtype"),
    seed: int = field_option(C, "seed"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Measure prefill latency, decode speed (batch 1 and more) and weight bytes of each MODEL; the first is the baseline."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    run_verb("bench", values, as_json=json_out, quiet=quiet)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
