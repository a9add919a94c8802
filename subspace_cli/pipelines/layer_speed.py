"""Is a factored pair slower than the dense matrix it replaces? Measured on the compress device.

At one token (decode) a Linear is a mat-vec bound by memory traffic, so a pair storing fewer
parameters is usually faster; but a pair close to break-even moves almost as many bytes in two
calls instead of one, and can lose. Each distinct (in, out, rank) is timed once per run, on
weights rotated through a working set larger than the caches, so the figures are not cache-hot.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from subspace_cli.linalg.rank_allocation import MatrixSpec

# (in, out, rank or None for the dense matrix, device, dtype) -> µs per call on x [1, in]
Timer = Callable[[int, int, "int | None", str, torch.dtype], float]

WORKING_SET_BYTES = 48 * 2**20  # above the last-level cache of most CPUs; a GPU's L2 is smaller
MAX_COPIES = 32
ROUNDS = 3


@dataclass(frozen=True)
class Speed:
    dense_us: float
    factored_us: float

    @property
    def slower(self) -> bool:
        return self.factored_us >= self.dense_us


class LinearTimer:
    """The default Timer. Weights are views into one random pool per (device, dtype), made once
    per run: filling fresh tensors would cost more than the timing itself."""

    def __init__(self):
        self._pools: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _pool(self, numel: int, device: str, dtype: torch.dtype) -> torch.Tensor:
        pool = self._pools.get((device, dtype))
        if pool is None or pool.numel() < numel:
            size = max(numel, WORKING_SET_BYTES // dtype.itemsize)
            gen = torch.Generator().manual_seed(0)  # not the global RNG: the run's seeded stream stays as it was
            pool = torch.empty(size).uniform_(-1, 1, generator=gen).to(device=device, dtype=dtype)
            self._pools[(device, dtype)] = pool
        return pool

    def __call__(self, in_f: int, out_f: int, rank: int | None, device: str, dtype: torch.dtype) -> float:
        """Median µs of one call on x [1, in]: F.linear(x, W [out, in]), or with `rank`
        F.linear(F.linear(x, D [r, in]), U [out, r])."""
        shapes = [(out_f, in_f)] if rank is None else [(rank, in_f), (out_f, rank)]
        numel = sum(a * b for a, b in shapes)
        copies = max(2, min(MAX_COPIES, -(-WORKING_SET_BYTES // (numel * dtype.itemsize))))
        pool = self._pool(copies * numel, str(device), dtype)
        weights = []
        for c in range(copies):
            parts, at = [], c * numel
            for a, b in shapes:
                parts.append(pool[at : at + a * b].view(a, b))
                at += a * b
            weights.append(parts)
        x = pool[:in_f].view(1, in_f).clone()  # [1, in]
        sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

        def call(parts):
            y = x
            for w in parts:
                y = F.linear(y, w)
            return y

        samples = []
        with torch.inference_mode():
            for parts in weights[:2]:
                call(parts)  # warm-up: kernel selection, first touch
            for _ in range(ROUNDS):
                sync()
                start = time.perf_counter()
                for parts in weights:
                    call(parts)
                sync()
                samples.append((time.perf_counter() - start) / copies)
        return sorted(samples)[len(samples) // 2] * 1e6


_REAL_TIMER = LinearTimer


def _machine(device: str) -> str:
    """What the timings depend on: the processor (or GPU), torch, the thread count."""
    import platform

    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                         if line.startswith("model name")), name)
        except OSError:
            pass
    return f"{name} | torch {torch.__version__} | {torch.get_num_threads()} threads"


class RecordedTimer:
    """The real timer, with its figures kept in `subspace_home()/layer_speed.json` per machine: the
    second compress on a machine reads the first one's timings, so the same command plans the same
    ranks (a fresh measurement could flip a matrix that sits at the edge). Delete the file to re-time."""

    def __init__(self, timer: LinearTimer):
        from subspace_cli.io.home import subspace_home

        self.timer, self.path = timer, subspace_home() / "layer_speed.json"
        self.figures: dict[str, float] = {}
        self.loaded: dict[str, dict[str, float]] = {}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            self.loaded = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass  # none yet, or unreadable: time afresh

    def __call__(self, in_f: int, out_f: int, rank: int | None, device: str, dtype: torch.dtype) -> float:
        machine = _machine(device)
        key = f"{in_f}x{out_f} rank {rank} {dtype}"
        known = self.loaded.get(machine, {})
        if isinstance(known.get(key), (int, float)):
            return float(known[key])
        figure = self.timer(in_f, out_f, rank, device, dtype)
        self.loaded.setdefault(machine, {})[key] = figure
        self.figures[key] = figure
        return figure

    def save(self) -> None:
        """Write the new figures (atomically; a failure to write only costs a re-measurement)."""
        if not self.figures:
            return
        from subspace_cli.io.home import file_lock

        try:
            with file_lock(self.path.with_suffix(".lock")):
                tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps(self.loaded, indent=1, sort_keys=True), encoding="utf-8")
                os.replace(tmp, self.path)
        except OSError:
            pass


def measure_candidates(specs: list[MatrixSpec], ranks: dict[str, int | None], max_saving: float, device: str,
                       dtype: torch.dtype, timer: Timer | None = None) -> dict[str, Speed]:
    """Dense vs factored time of every matrix given a rank whose saving is below `max_saving`
    parameters (the others are kept factored whatever their speed, so they are not timed)."""
    timer = timer or LinearTimer()
    if type(timer) is _REAL_TIMER:  # figures from any other timer (a test's) are not recorded
        timer = RecordedTimer(timer)
    memo: dict[tuple, float] = {}

    def timed(in_f, out_f, rank):
        key = (in_f, out_f, rank, str(device), dtype)
        if key not in memo:
            memo[key] = timer(in_f, out_f, rank, device, dtype)
        return memo[key]

    speeds = {}
    for s in specs:
        rank = ranks.get(s.name)
        if rank is None or s.dense_params - rank * s.rank_cost >= max_saving:
            continue
        speeds[s.name] = Speed(timed(s.in_features, s.out_features, None),
                               timed(s.in_features, s.out_features, rank))
    if isinstance(timer, RecordedTimer):
        timer.save()
    return speeds
