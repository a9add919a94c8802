"""Shared CLI plumbing: exit codes, --json output, logging and progress on stderr.

Commands build a config object, call one pipeline inside `run_command`, and print its summary.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import typer

from subspace_cli.errors import SubspaceError
from subspace_cli.pipelines.progress import progress_enabled, set_quiet

__all__ = ["progress_enabled", "run_command", "setup_logging", "parse_options", "fail"]


def setup_logging(quiet: bool, as_json: bool) -> None:
    set_quiet(quiet)
    level = logging.WARNING if quiet or as_json else logging.INFO
    from rich.logging import RichHandler
    from rich.console import Console

    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bypass --quiet and non-tty checks
    for noisy in ("transformers", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def fail(exc: SubspaceError, as_json: bool) -> None:
    message = " ".join(str(exc).split())  # one line, whatever the exception text held
    typer.echo(f"error: {message}", err=True)
    if as_json:
        payload: dict[str, Any] = {"ok": False, "exit_code": exc.exit_code, "error": message}
        failed = getattr(exc, "failed", None)
        if failed:
            payload["failed"] = failed
        summary = getattr(exc, "summary", None)
        if summary:
            payload.update(summary)
        typer.echo(json.dumps(payload, default=str))
    raise typer.Exit(exc.exit_code)


def run_command(fn: Callable[[], Any], *, as_json: bool, quiet: bool, render: Callable[[Any], None] | None = None):
    """Run a pipeline call, mapping errors to exit codes; print `--json` or a rich rendering."""
    setup_logging(quiet, as_json)
    try:
        result = fn()
    except SubspaceError as exc:
        fail(exc, as_json)
    except MemoryError as exc:
        from subspace_cli.errors import RuntimeFailure

        fail(RuntimeFailure("run", f"out of memory ({exc}); try --device cpu, fewer --calib-samples or a smaller --calib-seqlen"), as_json)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(130)
    if os.environ.get("RANK", "0") != "0":
        return result  # under `accelerate launch` / `torchrun` only the first process prints
    if as_json:
        payload = result.summary() if hasattr(result, "summary") else result
        typer.echo(json.dumps(payload, default=str))
    elif render is not None:
        render(result)
    return result


def parse_options(pairs: list[str] | None, flag: str = "--option") -> dict[str, Any]:
    """`-o key=value` pairs into a dict; values parsed as YAML scalars (numbers, bools)."""
    import yaml

    from subspace_cli.errors import UsageError

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} '{pair}' is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options
