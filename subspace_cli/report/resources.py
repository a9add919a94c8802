"""Wall time per stage and peak memory, for every report."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from subspace_cli import lifecycle
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


# How allocators word a failed allocation: CUDA's caching allocator, and the CPU allocator's
# "[enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory".
OOM_HINT = "docs/troubleshooting.md (Out of memory) lists what each verb holds and which options lower it"
_OOM_TEXTS = ("out of memory", "can't allocate memory", "defaultcpuallocator", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_class = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom_class is not None and isinstance(exc, oom_class):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXTS)


class StageTimer:
    """Times named stages; turns out-of-memory and numerical errors into exit-3 failures naming the stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with lifecycle.stage(name):
                yield
        except SubspaceError:
            raise
        except MemoryError as exc:
            raise RuntimeFailure(name, f"out of memory ({exc or 'allocation failed'}); {OOM_HINT}") from exc
        except RuntimeError as exc:
            text = str(exc)
            first_line = (text.splitlines() or [type(exc).__name__])[0]
            if is_out_of_memory(exc):
                raise RuntimeFailure(name, f"out of memory ({first_line}); {OOM_HINT}") from exc
            if "linalg" in text.lower():
                raise RuntimeFailure(name, first_line) from exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            log.debug("%s: %.1f s", name, elapsed)

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start
