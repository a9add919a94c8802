"""`subspace inspect MODEL`: spectra, effective ranks and break-even ranks of the block matrices."""

from __future__ import annotations

from typing import Optional

import typer

from subspace_cli.cli.common import run_command
from subspace_cli.cli.options import config_from_cli, field_argument, field_option
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
    json_out: bool = typer.Option(False, "--json", help="print one JSON summary on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or info logs"),
) -> None:
    """Print each matrix's effective rank, 90%/99%-energy ranks and break-even rank (whitened too with --calib)."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}

    def go():
        from subspace_cli.pipelines.inspect import run_inspect

        return run_inspect(config_from_cli(C, values))

    run_command(go, as_json=json_out, quiet=quiet, render=render)


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    whitened = result["calibration"] is not None
    table = Table(title=f"{result['model']} ({result['architecture']})", title_justify="left")
    for col in ("block", "matrix", "shape", "erank", "r90", "r99", "even"):
        table.add_column(col, justify="left" if col == "matrix" else "right")
    if whitened:
        for col in ("w-erank", "w-r90", "w-r99"):
            table.add_column(col, justify="right")
    for row in result["matrices"]:
        cells = [str(row["block"]), row["kind"], "×".join(map(str, row["shape"])), f"{row['effective_rank']:.1f}",
                 str(row["rank_90"]), str(row["rank_99"]), str(row["break_even_rank"])]
        if whitened:
            cells += [f"{row.get('whitened_effective_rank', float('nan')):.1f}",
                      str(row.get("whitened_rank_90", "-")), str(row.get("whitened_rank_99", "-"))]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    console.print("erank: effective rank; r90 / r99: rank keeping 90% / 99% of the energy; even: break-even rank"
                  + ("; w-: on the whitened spectrum (W·L)" if whitened else ""))
    summary = result["summary"]
    console.print(
        f"{summary['n_matrices']} matrices, {summary['params']:,} parameters; "
        f"keeping 90% / 99% of each matrix's energy would keep "
        f"{summary['params_fraction_at_90']:.1%} / {summary['params_fraction_at_99']:.1%} of them"
    )
    if whitened and "whitened_params_fraction_at_90" in summary:
        console.print(
            f"whitened on {result['calibration']['data']}: "
            f"{summary['whitened_params_fraction_at_90']:.1%} / {summary['whitened_params_fraction_at_99']:.1%}"
        )
    if result.get("plot"):
        console.print(f"plot: {result['plot']}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
