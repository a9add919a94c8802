"""Shared CLI plumbing: exit codes, --json output, logging and progress on stderr.

Commands build a config object, call one pipeline inside `run_command`, and print its summary.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import typer

from subspace_cli import lifecycle
from subspace_cli.errors import SubspaceError
from subspace_cli.pipelines.progress import progress_enabled, set_quiet

__all__ = ["progress_enabled", "run_command", "run_verb", "setup_logging", "parse_options", "fail", "emit_error", "set_debug"]


def setup_logging(quiet: bool, as_json: bool) -> None:
    set_quiet(quiet)
    level = logging.WARNING if quiet or as_json else logging.INFO
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bypass --quiet and non-tty checks
    for noisy in ("transformers", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


_debug = {"on": False}


def set_debug(on: bool) -> None:
    """`--debug` (anywhere on the command line) or SUBSPACE_DEBUG=1: print the traceback of a failure."""
    _debug["on"] = on


def debug_enabled() -> bool:
    return _debug["on"] or os.environ.get("SUBSPACE_DEBUG", "").lower() not in ("", "0", "false")


def emit_error(message: str, exit_code: int, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """One `error:` line on stderr; with --json also one error object on stdout. Then exit."""
    message = " ".join(str(message).split())  # one line, whatever the exception text held
    typer.echo(f"error: {message}", err=True)
    if as_json:
        from subspace_cli.report.json_safe import dumps

        payload: dict[str, Any] = {"ok": False, "exit_code": exit_code, "error": message, **(extra or {})}
        typer.echo(dumps(payload))
    raise typer.Exit(exit_code)


def fail(exc: SubspaceError, as_json: bool) -> None:
    extra: dict[str, Any] = {}
    failed = getattr(exc, "failed", None)
    if failed:
        extra["failed"] = failed
    summary = getattr(exc, "summary", None)
    if summary:
        extra.update(summary)
    stage = getattr(exc, "stage", None)
    if stage and exc.exit_code == 3:
        extra["stage"] = stage
    emit_error(str(exc), exc.exit_code, as_json, extra)


def unexpected(exc: BaseException) -> SubspaceError:
    """Any other exception as an exit-3 failure naming its stage, with a one-line cause."""
    from subspace_cli.errors import RuntimeFailure
    from subspace_cli.report.resources import OOM_HINT, is_out_of_memory

    stage = lifecycle.stage_of(exc) or "setup"
    text = (str(exc).strip().splitlines() or [""])[0]
    if is_out_of_memory(exc):
        return RuntimeFailure(stage, f"out of memory ({text or type(exc).__name__}); {OOM_HINT}")
    if isinstance(exc, OSError):
        where = f" '{exc.filename}'" if exc.filename else ""
        return RuntimeFailure(stage, f"{exc.strerror or text or type(exc).__name__}{where}")
    return RuntimeFailure(stage, f"unexpected {type(exc).__name__}: {text} (rerun with --debug for the traceback, "
                                 "and please report it)")


def interrupted(exc: KeyboardInterrupt, as_json: bool) -> None:
    """Ctrl-C or SIGTERM: say where it stopped and what was kept (the output itself never is)."""
    signal_name = getattr(exc, "signal_name", "Ctrl-C")
    stage = lifecycle.stage_of(exc)
    message = f"interrupted ({signal_name})" + (f" during stage '{stage}'" if stage else "")
    message += "; its output was not written"
    kept = lifecycle.kept()
    if kept:
        message += "; kept: " + ", ".join(f"{what} in {path}" for what, path in kept)
    emit_error(message, 143 if signal_name == "SIGTERM" else 130, as_json)


def run_command(fn: Callable[[], Any], *, as_json: bool, quiet: bool, render: Callable[[Any], None] | None = None):
    """Run a pipeline call, mapping every failure to an exit code; print `--json` or a rich rendering.

    SubspaceError keeps its code (2 input, 1 gate, 3 runtime); Ctrl-C and SIGTERM exit 130 / 143;
    anything else is exit 3 naming the stage it happened in, never a traceback (unless --debug).
    """
    setup_logging(quiet, as_json)
    lifecycle.reset()
    try:
        with lifecycle.sigterm_as_interrupt():
            result = fn()
    except (typer.Exit, typer.Abort):
        raise
    except SubspaceError as exc:
        _traceback_if_debug()
        fail(exc, as_json)
    except KeyboardInterrupt as exc:
        _traceback_if_debug()
        interrupted(exc, as_json)
    except Exception as exc:  # noqa: BLE001 - the boundary: re-raised below as exit 3 with its cause
        _traceback_if_debug()
        fail(unexpected(exc), as_json)
    if os.environ.get("RANK", "0") != "0":
        return result  # under `accelerate launch` / `torchrun` only the first process prints
    if as_json:
        from subspace_cli.report.json_safe import dumps

        payload = result.summary() if hasattr(result, "summary") else result
        typer.echo(dumps(payload))
    elif render is not None:
        render(result)
    return result


def _traceback_if_debug() -> None:
    if debug_enabled():
        import traceback

        traceback.print_exc()


def run_verb(name: str, values: dict[str, Any], *, as_json: bool, quiet: bool,
             options: list[str] | None = None) -> None:
    """A verb command's body: its -O pairs parsed when it takes them (exit 2 on a bad one), its config
    built from the CLI `values`, its runner called and the result rendered, through `run_command`."""
    from subspace_cli.cli.options import config_from_cli
    from subspace_cli.pipelines.verbs import VERBS

    verb = VERBS[name]

    def go():
        if options is not None:
            values["options"] = parse_options(options)
        return verb.run(config_from_cli(verb.config_class, values))

    run_command(go, as_json=as_json, quiet=quiet, render=verb.render)


def parse_options(pairs: list[str] | None, flag: str = "-O") -> dict[str, Any]:
    """`-O key=value` pairs into a dict (values read as strict YAML: numbers, bools, lists)."""
    from subspace_cli.io.yaml_files import parse_key_value

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, value = parse_key_value(pair, flag, "KEY=VALUE, e.g. -O rank=8 (see `subspace methods NAME`)")
        options[key.replace("-", "_")] = value
    return options
