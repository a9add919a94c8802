"""`subspace compress MODEL`: low-rank or sparse-dictionary factorisation of the Linear layers of a checkpoint."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import run_verb
from subspace_cli.cli.options import JsonFlag, MethodOptionFlags, QuietFlag, field_argument, field_option
from subspace_cli.pipelines.compress_config import CompressConfig as C


def compress(
    model: str = field_argument(C, "model"),
    out: str = field_option(C, "out", "--out", "-o", default=...),
    method: str = field_option(C, "method"),
    option: MethodOptionFlags = None,
    ratio: float = field_option(C, "ratio"),
    allocation: str = field_option(C, "allocation"),
    normalise: str = field_option(C, "normalise"),
    budget_scope: str = field_option(C, "budget_scope"),
    min_rank_fraction: float = field_option(C, "min_rank_fraction"),
    rank_multiple: Optional[int] = field_option(C, "rank_multiple"),
    dense_if_slower_below: float = field_option(C, "dense_if_slower_below"),
    sequential: bool = field_option(C, "sequential", "--sequential/--one-shot"),
    calib: List[str] = field_option(C, "calib"),
    calib_samples: int = field_option(C, "calib_samples"),
    calib_seqlen: int = field_option(C, "calib_seqlen"),
    eval: Optional[List[str]] = field_option(C, "eval"),
    eval_seqlen: int = field_option(C, "eval_seqlen"),
    eval_chars: int = field_option(C, "eval_chars"),
    skip_eval: bool = field_option(C, "skip_eval"),
    tasks: Optional[List[str]] = field_option(C, "tasks", "--tasks", default=None),
    task_examples: int = field_option(C, "task_examples"),
    bench: bool = field_option(C, "bench"),
    heal: Optional[int] = field_option(C, "heal"),
    heal_loss: str = field_option(C, "heal_loss"),
    heal_data: Optional[List[str]] = field_option(C, "heal_data"),
    heal_samples: Optional[int] = field_option(C, "heal_samples"),
    heal_seqlen: int = field_option(C, "heal_seqlen"),
    heal_batch_size: int = field_option(C, "heal_batch_size"),
    heal_lr: float = field_option(C, "heal_lr"),
    heal_top_k: int = field_option(C, "heal_top_k"),
    heal_scope: str = field_option(C, "heal_scope"),
    targets: Optional[str] = field_option(C, "targets"),
    exclude: Optional[str] = field_option(C, "exclude"),
    structure: Optional[str] = field_option(C, "structure"),
    format: str = field_option(C, "format"),
    fuse_projections: bool = field_option(C, "fuse_projections", "--fuse-projections/--no-fuse-projections"),
    shard_size: str = field_option(C, "shard_size"),
    batch_size: int = field_option(C, "batch_size"),
    devices: Optional[str] = field_option(C, "devices"),
    overwrite: bool = field_option(C, "overwrite"),
    device: str = field_option(C, "device"),
    dtype: str = field_option(C, "dtype"),
    seed: int = field_option(C, "seed"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Factor the Linear layers of MODEL's repeated blocks (low-rank pairs or sparse dictionaries) and write a checkpoint."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    run_verb("compress", values, as_json=json_out, quiet=quiet, options=option or [])


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
