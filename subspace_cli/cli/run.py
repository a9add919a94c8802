"""`subspace run RECIPE.yaml`: a stored single-step recipe (every output holds one as recipe.yaml)
or a multi-step pipeline (docs/recipes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from subspace_cli.cli.common import run_command
from subspace_cli.cli.options import JsonFlag, QuietFlag


def run(
    recipe: Path = typer.Argument(..., help="recipe.yaml written by a previous run, or a pipeline {vars, steps} (docs/recipes.md)"),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="single-step recipe: a config field, KEY=VALUE (e.g. out=new-dir); pipeline: a var, "
        "NAME=VALUE, or one step's field, STEP.FIELD=VALUE; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate every step and print the resolved plan; load no weights"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Run a recipe: one `verb` with its `config`, or a pipeline of `steps` run in order (exit 1 if a gate fails)."""

    def go():
        from subspace_cli.errors import SubspaceError
        from subspace_cli.pipelines.pipeline_run import run_recipe

        try:
            return run_recipe(recipe, set_ or [], dry_run=dry_run)
        except SubspaceError as exc:
            if not json_out and getattr(exc, "outcomes", None) is not None:
                _render_stopped(exc)  # people see what ran, and the failing gate's numbers
            raise

    run_command(go, as_json=json_out, quiet=quiet, render=_render)


def _render_step(verb: str, result) -> None:
    from subspace_cli.pipelines.verbs import VERBS

    VERBS[verb].render(result)


def _heading(index: int, total: int, name: str, verb: str) -> None:
    typer.secho(f"── step {index}/{total} '{name}': subspace {verb}", bold=True)


def _render(result) -> None:
    from subspace_cli.pipelines.pipeline_run import PipelineResult

    if isinstance(result, PipelineResult):
        total = len(result.plan.steps)
        for i, outcome in enumerate(result.outcomes, 1):
            _heading(i, total, outcome.step.name, outcome.step.verb)
            _render_step(outcome.step.verb, outcome.result)
        if result.pipeline_recipe:
            typer.echo(f"resolved pipeline: {result.pipeline_recipe}")
    elif hasattr(result, "summary"):
        _render_step(result.verb, result)
    else:  # a dry-run plan, or a single eval / inspect step's dict
        import yaml

        typer.echo(yaml.safe_dump(result, sort_keys=False))


def _render_stopped(exc) -> None:
    outcomes = exc.outcomes
    for i, outcome in enumerate(outcomes, 1):
        _heading(i, exc.n_steps, outcome.step.name, outcome.step.verb)
        _render_step(outcome.step.verb, outcome.result)
    failed = exc.summary["steps"][-1]
    if failed["verb"] == "eval" and failed.get("summary"):
        _heading(len(outcomes) + 1, exc.n_steps, failed["name"], failed["verb"])
        _render_step("eval", failed["summary"])


def register(app: typer.Typer) -> None:
    app.command("run")(run)
