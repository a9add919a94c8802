"""`subspace adapt MODEL --method M --data D`: train an SVD-based / subspace adapter, write a PEFT adapter."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import run_verb
from subspace_cli.cli.options import JsonFlag, MethodOptionFlags, QuietFlag, field_argument, field_option
from subspace_cli.pipelines.adapt_config import AdaptConfig as C


def adapt(
    model: str = field_argument(C, "model"),
    out: str = field_option(C, "out", "--out", "-o", default=...),
    method: str = field_option(C, "method"),
    option: MethodOptionFlags = None,
    data: List[str] = field_option(C, "data"),
    format: str = field_option(C, "format"),
    rank: int = field_option(C, "rank"),
    alpha: Optional[float] = field_option(C, "alpha"),
    targets: Optional[str] = field_option(C, "targets"),
    exclude: Optional[str] = field_option(C, "exclude"),
    steps: int = field_option(C, "steps"),
    lr: Optional[float] = field_option(C, "lr"),
    weight_decay: float = field_option(C, "weight_decay"),
    warmup_steps: int = field_option(C, "warmup_steps"),
    batch_size: int = field_option(C, "batch_size"),
    grad_accum: int = field_option(C, "grad_accum"),
    max_grad_norm: float = field_option(C, "max_grad_norm"),
    seqlen: int = field_option(C, "seqlen"),
    packing: bool = field_option(C, "packing", "--packing/--no-packing"),
    precision: str = field_option(C, "precision"),
    gradient_checkpointing: bool = field_option(C, "gradient_checkpointing"),
    eval_every: int = field_option(C, "eval_every"),
    eval_rows: int = field_option(C, "eval_rows"),
    save_every: int = field_option(C, "save_every"),
    checkpoint_dir: Optional[str] = field_option(C, "checkpoint_dir"),
    resume: Optional[str] = field_option(C, "resume"),
    merge: bool = field_option(C, "merge"),
    shard_size: str = field_option(C, "shard_size"),
    overwrite: bool = field_option(C, "overwrite"),
    device: str = field_option(C, "device"),
    dtype: str = field_option(C, "dtype"),
    seed: int = field_option(C, "seed"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train adapters on MODEL's block Linears and write a PEFT adapter that loads on the untouched base."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    run_verb("adapt", values, as_json=json_out, quiet=quiet, options=option or [])


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
