"""Exceptions that map to the CLI's exit codes (see ARCHITECTURE.md, "Exit codes").

Raise these for anything a user can cause; the CLI prints the message on one line and exits
with the code. Never `assert` on user input.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SubspaceError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 3


class UsageError(SubspaceError):
    """Bad input or usage (exit 2). The message names the bad value and what would be valid."""

    exit_code = 2


class GateFailed(SubspaceError):
    """A quality gate failed (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, failed: list | None = None):
        super().__init__(message)
        self.failed = failed or []


class RuntimeFailure(SubspaceError):
    """Out of memory or a numerical failure (exit 3); names the stage that failed."""

    exit_code = 3

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
