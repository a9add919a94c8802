"""Gram accumulation: naive float64 per layer vs float32 chunk products summed into float64,
computed once per distinct layer input (q/k/v and gate/up share theirs).

Both sides run in one process over the same SmolLM2-135M calibration activations
(64 × 256 = 16,384 tokens, all 210 block matrices); only time spent inside Gram updates is
counted, and the largest relative difference between the two sets of Grams is reported.

    python benchmarks/gram_speed.py
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

import subspace_cli.pipelines.calibration as calibration
from subspace_cli.io import data
from subspace_cli.walk import in_out_features
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.linalg.gram import GramStats

SPENT = {"s": 0.0}


class TimedGram(GramStats):
    def update(self, x):
        start = time.perf_counter()
        super().update(x)
        SPENT["s"] += time.perf_counter() - start


class NaiveGram(GramStats):
    """The straightforward version: every token product in float64."""

    def update(self, x):
        start = time.perf_counter()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram += x.T @ x
        self.abs_sum += x.abs().sum(0)
        self.n_tokens += x.shape[0]
        SPENT["s"] += time.perf_counter() - start


@contextmanager
def naive_record_inputs(modules, device="cpu"):
    """One Gram per layer, no sharing of identical inputs."""
    stats = {name: NaiveGram(in_out_features(m)[0], device=device) for name, m in modules.items()}
    handles = [m.register_forward_hook(lambda mod, a, o, s=stats[n]: s.update(a[0].detach())) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def timed(label, model, ids):
    SPENT["s"] = 0.0
    start = time.perf_counter()
    grams = calibration.collect_dense_grams(model, ids)
    total = time.perf_counter() - start
    print(f"{label:>28}: Gram updates {SPENT['s']:6.1f} s, whole pass {total:6.1f} s", flush=True)
    return grams, SPENT["s"]


def main() -> None:
    loaded = load_model_and_tokenizer("builtin:smollm2-135m")
    ids = data.resolve_calibration(["builtin:shakespeare"], loaded.tokenizer, 64, 256, 0).input_ids
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ids.numel()} tokens")
    original = calibration.record_inputs
    calibration.GramStats = TimedGram
    ours, t_ours = timed("float32 chunks, shared", loaded.model, ids)
    calibration.record_inputs = naive_record_inputs
    naive, t_naive = timed("naive float64 per layer", loaded.model, ids)
    calibration.record_inputs = original
    worst = max(float((ours[n].gram - naive[n].gram).abs().max() / naive[n].gram.abs().max()) for n in naive)
    print(f"speed-up of Gram updates: {t_naive / t_ours:.1f}x; max relative Gram difference {worst:.2e}")


if __name__ == "__main__":
    main()
