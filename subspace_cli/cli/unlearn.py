"""`subspace unlearn MODEL --method M --forget F --retain R --out DIR`: remove knowledge, keep the rest."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import run_verb
from subspace_cli.cli.options import JsonFlag, MethodOptionFlags, QuietFlag, field_argument, field_option
from subspace_cli.pipelines.unlearn_config import UnlearnConfig as C


def unlearn(
    model: str = field_argument(C, "model"),
    out: str = field_option(C, "out", "--out", "-o", default=...),
    method: str = field_option(C, "method"),
    option: MethodOptionFlags = None,
    forget: str = field_option(C, "forget", default=...),
    retain: str = field_option(C, "retain", default=...),
    eval_forget: Optional[str] = field_option(C, "eval_forget"),
    eval_retain: Optional[str] = field_option(C, "eval_retain"),
    forget_samples: int = field_option(C, "forget_samples"),
    retain_samples: int = field_option(C, "retain_samples"),
    seqlen: int = field_option(C, "seqlen"),
    eval_seqlen: int = field_option(C, "eval_seqlen"),
    eval_chars: int = field_option(C, "eval_chars"),
    tasks: Optional[List[str]] = field_option(C, "tasks", "--tasks", default=None),
    task_examples: int = field_option(C, "task_examples"),
    batch_size: int = field_option(C, "batch_size"),
    shard_size: str = field_option(C, "shard_size"),
    overwrite: bool = field_option(C, "overwrite"),
    device: str = field_option(C, "device"),
    dtype: str = field_option(C, "dtype"),
    seed: int = field_option(C, "seed"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Remove what MODEL knows of the forget data while keeping its behaviour on the retain data."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    run_verb("unlearn", values, as_json=json_out, quiet=quiet, options=option or [])


def register(app: typer.Typer) -> None:
    app.command("unlearn")(unlearn)
