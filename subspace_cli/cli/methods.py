"""`subspace methods [NAME]`: the method catalogue with papers, needs and options."""

from __future__ import annotations

from typing import Optional

import typer

from subspace_cli.cli.common import run_command
from subspace_cli.cli.options import JsonFlag


def methods(
    name: Optional[str] = typer.Argument(None, help="show one method's options"),
    json_out: JsonFlag = False,
) -> None:
    """List the methods of every verb, or one method's options with defaults."""

    def go():
        from subspace_cli.methods.catalog import methods_for
        from subspace_cli.methods.registry import VERBS_WITH_METHODS

        catalogue = []
        for verb in VERBS_WITH_METHODS:
            for m in methods_for(verb).values():
                if name and m.name != name:
                    continue
                options = {
                    (f.alias or k): {"default": f.default, "description": f.description}  # the key users type
                    for k, f in m.config_class.model_fields.items()
                }
                entry = {"verb": verb, "name": m.name, "summary": m.summary, "paper": m.paper,
                         "needs": sorted(need.value for need in m.needs), "options": options, **m.describe()}
                catalogue.append(entry)
        if name and not catalogue:
            from subspace_cli.errors import UsageError

            raise UsageError(f"unknown method '{name}'; run `subspace methods` for the list")
        return {"methods": catalogue}

    run_command(go, as_json=json_out, quiet=True, render=_render)


def _render(result: dict) -> None:
    from rich.console import Console

    console = Console()
    if len(result["methods"]) == 1:  # `subspace methods NAME`: every option on its own line
        _render_one(console, result["methods"][0])
        return
    from rich.table import Table

    table = Table(title="subspace methods (`subspace methods NAME` for one method's options)")
    for col in ("verb", "method", "what", "needs", "paper"):
        table.add_column(col)
    for m in result["methods"]:
        table.add_row(m["verb"], m["name"], m["summary"], ", ".join(m["needs"]) or "–", m["paper"])
    console.print(table)


def _render_one(console, m: dict) -> None:
    from rich.table import Table

    console.print(f"[bold]{m['verb']} --method {m['name']}[/bold]: {m['summary']}")
    console.print(f"paper: {m['paper']}")
    console.print(f"needs: {', '.join(m['needs']) or 'nothing beyond the model'}")
    if "default_lr" in m:
        console.print(f"default learning rate: {m['default_lr']:g}")
    table = Table(title="options (-O KEY=VALUE)")
    for col in ("option", "default", "meaning"):
        table.add_column(col)
    for key, option in m["options"].items():
        table.add_row(key, "–" if option["default"] is None else str(option["default"]), option["description"] or "")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)
