"""The subspace cache directory, and building things in it exactly once.

Built-in models and corpora are converted on first use and kept under `subspace_home()`.
`build_once` makes that safe: the work happens in a temporary sibling that is renamed into
place at the end (an interrupted build leaves nothing behind), under an exclusive file lock
(two processes never build the same entry at once; the second one waits and reuses it).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX only; elsewhere concurrent first use is simply not guarded
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_HOME = Path("~/.cache/subspace")


def subspace_home() -> Path:
    """`$SUBSPACE_HOME` if set, else `~/.cache/subspace`; created on demand."""
    home = Path(os.environ.get("SUBSPACE_HOME") or DEFAULT_HOME).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process holding %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable(root: Path) -> None:
    # mkdtemp (and some writers' temp files) are owner-only; a cache entry should read like
    # any other directory made under the default umask.
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return directory `final`, calling `build(tmp_dir)` to create it if it does not exist.

    `build` fills an empty temporary sibling directory; it is renamed to `final` only when
    `build` returns, so an existing `final` is always complete (the rename is atomic).
    """
    final = Path(final)
    if final.is_dir():  # fast path, no lock: a present directory was renamed in whole
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        # Leftovers of a killed build; safe to remove because we hold the lock.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            _make_readable(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
