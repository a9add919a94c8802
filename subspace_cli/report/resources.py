"""Wall time per stage and peak memory, for every report."""

from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from subspace_cli.errors import RuntimeFailure, SubspaceError

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_device_mb() -> float | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The busiest GPU's peak: with --devices one process uses several, each with its own counter.
        return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    return None


class StageTimer:
    """Times named stages; turns out-of-memory and numerical errors into exit-3 failures naming the stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except SubspaceError:
            raise
        except MemoryError as exc:
            raise RuntimeFailure(name, f"out of memory ({exc})") from exc
        except RuntimeError as exc:
            text = str(exc)
            if "out of memory" in text.lower() or "linalg" in text.lower():
                raise RuntimeFailure(name, text.splitlines()[0]) from exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            log.debug("%s: %.1f s", name, elapsed)

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start
