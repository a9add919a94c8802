"""The `subspace` command. Importing this module must not import torch (keeps --help fast)."""

from __future__ import annotations

import typer

from subspace_cli import __version__

app = typer.Typer(
    name="subspace",
    help="Subspace surgery on Hugging Face checkpoints: compress, adapt, merge, unlearn, inspect, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"subspace {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Subspace surgery on Hugging Face checkpoints."""


def _register() -> None:
    from subspace_cli.cli import adapt, compress, evaluate, inspect, merge, methods, run, schema, unlearn

    for module in (compress, adapt, merge, unlearn, inspect, evaluate, run, schema, methods):
        module.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
