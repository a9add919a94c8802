"""`subspace schema`: the JSON Schema of recipe files, for editors and CI linters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def schema(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the schema to this file instead of stdout"),
) -> None:
    """Print the JSON Schema of `subspace run` recipes: single-step {verb, config} and pipelines {vars, steps}."""
    import json

    from subspace_cli.pipelines.recipe_schema import recipe_schema

    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        from subspace_cli.cli.common import fail
        from subspace_cli.errors import UsageError

        fail(UsageError(f"--out '{out}': cannot write the schema there ({exc.strerror})"), as_json=False)
    typer.echo(f"wrote {out}", err=True)


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
