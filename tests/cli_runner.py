"""Run the `subspace` CLI in-process, the way a test would run `python -m subspace_cli ...`.

A subprocess pays 2-4 s of interpreter and torch start-up per call; in-process it is the command
alone. The result has the same fields a `subprocess.run(..., capture_output=True, text=True)` gives
the tests (returncode, stdout, stderr), and an uncaught exception reads as it would there: exit 1
with its traceback on stderr.

In-process runs share the test process's global state, so what a run may change is put back:
cwd, environment, root logging handlers and levels, the CLI's quiet/debug switches, torch's thread
count, default dtype and RNG states, transformers' progress bars. Keep a real subprocess only for what needs its own process:
signals, blocked imports, the `python -m subspace_cli` entry point, distributed launches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import subprocess
import sys
import traceback

__all__ = ["Result", "run_cli", "run_module"]

# Loggers the CLI's setup_logging reconfigures (subspace_cli.cli.common).
_LOGGERS = ("", "transformers", "huggingface_hub", "accelerate", "torch")


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    exception: BaseException | None = None  # an exception that escaped the CLI (a subprocess would exit 1)


def run_cli(*args, cwd=None, env: dict[str, str | None] | None = None) -> Result:
    """`subspace ARGS...` in this process. `env` holds overrides of os.environ (None unsets a
    variable), unlike subprocess's env, which replaces it; `cwd` is the working directory of the run."""
    from typer.testing import CliRunner

    from subspace_cli.cli.app import app

    with _restored_state(), _chdir(cwd):
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    escaped = None if isinstance(result.exception, SystemExit) else result.exception
    stderr = result.stderr
    if escaped is not None:
        stderr += "".join(traceback.format_exception(escaped))  # what Python prints before exit 1
    return Result(result.exit_code, result.stdout, stderr, escaped)


def run_module(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m subspace_cli ARGS...` in a process of its own: for checks of the entry point itself."""
    return subprocess.run([sys.executable, "-m", "subspace_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@contextlib.contextmanager
def _chdir(cwd):
    if cwd is None:
        yield
        return
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _restored_state():
    import torch

    from subspace_cli.cli import common
    from subspace_cli.pipelines import progress

    environ = dict(os.environ)
    root = logging.getLogger()
    handlers = root.handlers[:]
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    switches = dict(common._debug), dict(progress._state)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    rng = torch.random.get_rng_state(), random.getstate()
    bars = _hf_progress_bars()
    try:
        yield
    finally:
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        common._debug.update(switches[0])
        progress._state.update(switches[1])
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.random.set_rng_state(rng[0])
        random.setstate(rng[1])
        hf = sys.modules.get("transformers.utils.logging")
        if hf is not None and hf.is_progress_bar_enabled() != bars:  # setup_logging turns them off
            (hf.enable_progress_bar if bars else hf.disable_progress_bar)()


def _hf_progress_bars() -> bool:
    hf = sys.modules.get("transformers.utils.logging")
    return True if hf is None else hf.is_progress_bar_enabled()
