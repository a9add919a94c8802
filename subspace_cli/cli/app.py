"""The `subspace` command. Importing this module must not import torch (keeps --help fast)."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

try:  # typer 0.2x vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from subspace_cli import __version__


class SubspaceGroup(TyperGroup):
    """The root command: parse errors keep the one-line `error:` format (and a JSON error object
    with --json) instead of click's box, and `--debug` is accepted anywhere on the line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from subspace_cli.cli.common import emit_error, set_debug

        args = list(sys.argv[1:] if args is None else args)
        options = args[: args.index("--")] if "--" in args else args
        set_debug("--debug" in options)
        args = [a for i, a in enumerate(args) if not (a == "--debug" and i < len(options))]
        as_json = "--json" in options
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:
            exc.show()  # `subspace` or `subspace VERB` alone: the help, as before
            code = exc.exit_code
        except click_errors.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "subspace"
            try:
                emit_error(f"{command}: {exc.format_message()} (see '{command} --help')", 2, as_json)
            except typer.Exit as done:
                code = done.exit_code
        except (getattr(click_errors, "Abort", typer.Abort), typer.Abort):  # Ctrl-C or EOF while click itself was prompting or parsing
            try:
                emit_error("interrupted (Ctrl-C) before the command started; nothing was written", 130, as_json)
            except typer.Exit as done:
                code = done.exit_code
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=SubspaceGroup,
    name="subspace",
    help="Subspace surgery on Hugging Face checkpoints: compress, adapt, merge, unlearn, inspect, evaluate, bench.",
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
    debug: bool = typer.Option(False, "--debug", help="print the traceback of a failure (also accepted after the verb, "
                               "or SUBSPACE_DEBUG=1)"),
) -> None:
    """Subspace surgery on Hugging Face checkpoints."""


# Each verb of pipelines/verbs.py has its command in cli/<module>.py; then the tools around them.
COMMAND_MODULES = {"eval": "evaluate"}
_TOOLS = ("run", "schema", "methods")


def _register() -> None:
    import importlib

    from subspace_cli.pipelines.verbs import VERBS

    for name in (*VERBS, *_TOOLS):
        importlib.import_module(f"subspace_cli.cli.{COMMAND_MODULES.get(name, name)}").register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
