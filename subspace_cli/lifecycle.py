"""What the CLI's error boundary needs to know about the run in progress: the stage it is in,
what it has already left on disk, and SIGTERM handled like Ctrl-C.

Bottom layer (imports nothing of the package), so pipelines, io and the CLI can all use it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_stages: list[str] = []  # innermost last
_kept: list[tuple[str, str]] = []  # (what, path) written before the output, kept on failure
_inputs: list[tuple[str, str]] = []  # (label, path) read by the command itself, e.g. `subspace run`'s recipe


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every `finally` and atomic output cleans up."""

    signal_name = "SIGTERM"


def reset() -> None:
    """Start of a command: no stage, nothing kept (commands can run several times in one process)."""
    _stages.clear()
    _kept.clear()
    _inputs.clear()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the code inside as stage `name`; an exception leaving it is tagged with the stage."""
    _stages.append(name)
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "subspace_stage", None) is None:
            try:
                exc.subspace_stage = name  # innermost stage wins
            except AttributeError:  # pragma: no cover - exceptions with __slots__
                pass
        raise
    finally:
        _stages.pop()


def current_stage() -> str | None:
    return _stages[-1] if _stages else None


def stage_of(exc: BaseException) -> str | None:
    """The stage an exception left, or the stage in progress."""
    return getattr(exc, "subspace_stage", None) or current_stage()


def keep(what: str, path: Path | str) -> None:
    """Record something written outside the atomic output (training checkpoints) that a failed
    or interrupted run leaves behind on purpose, so the message can say so."""
    entry = (what, str(path))
    if entry not in _kept:
        _kept.append(entry)


def kept() -> list[tuple[str, str]]:
    return list(_kept)


def add_input(label: str, path: Path | str) -> None:
    """A file the command reads besides its verbs' own inputs (a recipe): no output may touch it."""
    _inputs.append((label, str(path)))


def command_inputs() -> list[tuple[str, str]]:
    return list(_inputs)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt) instead of killing the
    process outright, so temporary output directories are removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
