"""Killing `subspace compress` while it writes its checkpoint (ARCHITECTURE.md "Atomic output").

A wrapper runs the real CLI in a subprocess with the pipeline's write step patched to write and
then block, signalling readiness through a marker file; the test then sends SIGTERM or SIGKILL.

- SIGTERM: the process exits non-zero with one `error:` (or `interrupted`) line and no
  traceback, and leaves no `.out.tmp-*` directory beside the output.
- SIGKILL: the temporary directory may stay behind, but the next successful run with the same
  --out leaves no stale `.out.tmp-*` / `.out.old-*` sibling.
- Either way, an OUT written by an earlier successful run is intact (same files, same bytes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_input_harness import TINY, TRACEBACK

pytestmark = pytest.mark.slow  # real processes killed mid-write

WRAPPER = r"""
import sys, time
from pathlib import Path

marker = Path(sys.argv[1])
import subspace_cli.pipelines.compress as pipeline

if not hasattr(pipeline, "write_checkpoint"):
    sys.exit("test_kill wrapper: subspace_cli.pipelines.compress.write_checkpoint is gone; update the patch target")
real = pipeline.write_checkpoint


def write_then_block(*args, **kwargs):
    result = real(*args, **kwargs)
    marker.write_text("writing")
    time.sleep(600)
    return result


pipeline.write_checkpoint = write_then_block
sys.argv = ["subspace", *sys.argv[2:]]
from subspace_cli.cli.app import main

main()
"""

READY_TIMEOUT_S = 180


def _compress_argv(overwrite: bool) -> list[str]:
    return ["compress", "model", "--calib", "data.txt", *TINY["compress"], "--skip-eval", "--quiet",
            "--out", "out", *(["--overwrite"] if overwrite else [])]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def _leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.startswith((".out.tmp-", ".out.old-")))


def _run_in_process(work: Path, monkeypatch, overwrite: bool):
    from typer.testing import CliRunner

    from subspace_cli.cli.app import app

    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, _compress_argv(overwrite))
    assert result.exit_code == 0, f"compress failed (exit {result.exit_code}):\n{result.stderr}"
    return result


@pytest.fixture()
def work(tmp_path, bad_assets) -> Path:
    from tiny_models import write_text

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(bad_assets["llama"], work / "model")
    write_text(work / "data.txt")
    return work


def _start_and_wait(work: Path, marker: Path, overwrite: bool) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(marker), *_compress_argv(overwrite)], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"compress exited ({proc.returncode}) before reaching its write step:\n{err[-3000:]}{out[-1000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"compress did not reach its write step within {READY_TIMEOUT_S}s")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "existing-out"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kill_during_write(sig, existing, work, tmp_path, monkeypatch):
    before = None
    if existing:
        _run_in_process(work, monkeypatch, overwrite=False)
        before = _tree(work / "out")
        assert before, "the earlier run wrote nothing"
    marker = tmp_path / "writing.marker"
    proc = _start_and_wait(work, marker, overwrite=existing)
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    problems = []
    if existing:
        after = _tree(work / "out") if (work / "out").is_dir() else {}
        if after != before:
            missing = sorted(set(before) - set(after))
            changed = sorted(k for k in before if k in after and after[k] != before[k])
            problems.append(f"the earlier OUT is not intact after {sig.name}: missing {missing[:5]}, "
                            f"changed {changed[:5]}, new {sorted(set(after) - set(before))[:5]}")
    elif (work / "out").exists():
        problems.append(f"a half-written OUT exists after {sig.name}: {sorted(os.listdir(work / 'out'))[:6]}")

    if sig == signal.SIGTERM:
        if proc.returncode == 0:
            problems.append("exit code 0 after SIGTERM")
        lines = [line for line in err.splitlines() if line.startswith("error:") or line.startswith("interrupted")]
        if len(lines) != 1:
            problems.append(f"{len(lines)} `error:` / `interrupted` lines on stderr after SIGTERM (want 1)")
        if TRACEBACK in err or TRACEBACK in out:
            problems.append("a traceback was printed after SIGTERM")
        if _leftovers(work):
            problems.append(f"temporary directories left after SIGTERM: {_leftovers(work)}")
    else:
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        # The next successful run with the same --out cleans up after the killed one.
        _run_in_process(work, monkeypatch, overwrite=(work / "out").exists())
        if _leftovers(work):
            problems.append(f"stale siblings after a successful rerun following SIGKILL: {_leftovers(work)}")

    assert not problems, (f"{sig.name} ({'existing' if existing else 'fresh'} OUT): " + "; ".join(problems)
                          + f"\n  exit code: {proc.returncode}\n  stderr tail: {err[-1500:]!r}")
