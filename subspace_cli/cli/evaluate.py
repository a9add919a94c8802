"""`subspace eval MODEL --data D`: perplexity, drift against a baseline, quality gates (exit 1)."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import run_command
from subspace_cli.cli.options import config_from_cli, field_argument, field_option
from subspace_cli.pipelines.evaluate import EvalConfig as C


def evaluate(
    model: str = field_argument(C, "model"),
    data: str = field_option(C, "data", "--data", "-d", default=...),
    baseline: Optional[str] = field_option(C, "baseline"),
    eval_seqlen: int = field_option(C, "eval_seqlen"),
    eval_chars: int = field_option(C, "eval_chars"),
    split: str = field_option(C, "split"),
    fail_if: Optional[List[str]] = field_option(C, "fail_if", "--fail-if", default=None),
    batch_size: int = field_option(C, "batch_size"),
    device: str = field_option(C, "device"),
    devices: Optional[str] = field_option(C, "devices"),
    dtype: str = field_option(C, "dtype"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON summary on stdout (also when a gate fails)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or info logs"),
) -> None:
    """Score MODEL's perplexity on held-out text; with --baseline also ppl_ratio and per-token KL."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}
    values["fail_if"] = list(fail_if or [])

    def go():
        from subspace_cli.errors import GateFailed
        from subspace_cli.pipelines.evaluate import run_eval

        try:
            return run_eval(config_from_cli(C, values))
        except GateFailed as exc:
            if not json_out and getattr(exc, "summary", None):
                render(exc.summary)  # people see the numbers as well as the failed gates
            raise

    run_command(go, as_json=json_out, quiet=quiet, render=render)


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['data']} ({result['split']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ppl", "nll", "baseline_ppl", "ppl_ratio", "kl", "embedding_similarity", "n_tokens", "n_windows"):
        if key in result:
            value = result[key]
            table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.6g}")
    console = Console()
    console.print(table)
    if result.get("note"):
        console.print(result["note"])
    for gate in result.get("gates", []):
        status = "[red]FAIL[/red]" if gate["failed"] else "[green]pass[/green]"
        console.print(f"{status}  fail-if {gate['condition']}  ({gate['field']} = {gate['value']:.6g})")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
