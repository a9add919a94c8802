"""`subspace run RECIPE.yaml`: re-run a stored recipe (each output holds one as recipe.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from subspace_cli.cli.common import run_command


def run(
    recipe: Path = typer.Argument(..., help="recipe.yaml written by a previous run (or by hand)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a config field: KEY=VALUE (e.g. out=new-dir)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and print the resolved config; load nothing"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON summary on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or info logs"),
) -> None:
    """Run a recipe: `verb` plus the verb's `config`, as stored in every output's recipe.yaml."""

    def go():
        from subspace_cli.pipelines.recipes import run_recipe

        return run_recipe(recipe, set_ or [], dry_run=dry_run)

    run_command(go, as_json=json_out, quiet=quiet, render=_render)


def _render(result) -> None:
    if hasattr(result, "summary"):
        from subspace_cli.report.render import print_report

        print_report(result)
    else:
        import yaml

        typer.echo(yaml.safe_dump(result, sort_keys=False))


def register(app: typer.Typer) -> None:
    app.command("run")(run)
