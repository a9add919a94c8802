"""`subspace inspect MODEL`: spectra, effective ranks and break-even ranks of the block matrices."""

from __future__ import annotations

from typing import Optional

import typer

from subspace_cli.cli.common import run_verb
from subspace_cli.cli.options import JsonFlag, QuietFlag, field_argument, field_option
from subspace_cli.pipelines.inspect import InspectConfig as C


def inspect(
    model: str = field_argument(C, "model"),
    calib: Optional[str] = field_option(C, "calib"),
    calib_samples: int = field_option(C, "calib_samples"),
    calib_seqlen: int = field_option(C, "calib_seqlen"),
    targets: Optional[str] = field_option(C, "targets"),
    exclude: Optional[str] = field_option(C, "exclude"),
    plot: Optional[str] = field_option(C, "plot"),
    batch_size: int = field_option(C, "batch_size"),
    device: str = field_option(C, "device"),
    dtype: str = field_option(C, "dtype"),
    seed: int = field_option(C, "seed"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Print each matrix's effective rank, 90%/99%-energy ranks and break-even rank (whitened too with --calib)."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    run_verb("inspect", values, as_json=json_out, quiet=quiet)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
