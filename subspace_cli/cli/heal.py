"""`subspace heal COMPRESSED --teacher DENSE --out DIR`: distil a compressed model back toward its dense teacher."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import run_verb
from subspace_cli.cli.options import JsonFlag, QuietFlag, field_argument, field_option
from subspace_cli.pipelines.heal_config import HealConfig as C


def heal(
    model: str = field_argument(C, "model"),
    out: str = field_option(C, "out", "--out", "-o", default=...),
    teacher: Optional[str] = field_option(C, "teacher"),
    steps: int = field_option(C, "steps"),
    heal_loss: str = field_option(C, "heal_loss"),
    heal_data: Optional[List[str]] = field_option(C, "heal_data"),
    heal_samples: Optional[int] = field_option(C, "heal_samples"),
    heal_seqlen: int = field_option(C, "heal_seqlen"),
    heal_batch_size: int = field_option(C, "heal_batch_size"),
    heal_lr: float = field_option(C, "heal_lr"),
    heal_top_k: int = field_option(C, "heal_top_k"),
    heal_scope: str = field_option(C, "heal_scope"),
    eval: Optional[List[str]] = field_option(C, "eval"),
    eval_seqlen: int = field_option(C, "eval_seqlen"),
    eval_chars: int = field_option(C, "eval_chars"),
    eval_every: int = field_option(C, "eval_every"),
    tasks: Optional[List[str]] = field_option(C, "tasks", "--tasks", default=None),
    task_examples: int = field_option(C, "task_examples"),
    eval_rows: int = field_option(C, "eval_rows"),
    save_every: int = field_option(C, "save_every"),
    checkpoint_dir: Optional[str] = field_option(C, "checkpoint_dir"),
    resume: Optional[str] = field_option(C, "resume"),
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
    """Train a compressed model's own factors toward its dense teacher (same format, same parameter count)."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    run_verb("heal", values, as_json=json_out, quiet=quiet)


def register(app: typer.Typer) -> None:
    app.command("heal")(heal)
