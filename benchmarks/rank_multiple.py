"""Factored pair speed at a rank r against r rounded to multiples of 8, 16, 32 and 64: the
evidence for `--rank-multiple` auto (8 on CPU, 64 on CUDA).

Times F.linear(F.linear(x, D [r, in]), U [out, r]) (and the dense F.linear(x, W [out, in]) for
reference) for the SmolLM2-135M block shapes at r = 0.8 × break-even (what ratio 0.2 gives;
not a multiple of 8), x with 1 row (decode) and 128 rows (prefill). Weights are rotated through
`--copies` copies so they are not cache-hot. "↓8" is r rounded down to a multiple of 8, "↑8" up.
If r costs as much as ↑N, the remainder is paid for and buys nothing; if ↓N is faster than its
share of r, rounding down pays twice (fewer parameters and a faster kernel).

    OMP_NUM_THREADS=2 python benchmarks/rank_multiple.py
    python benchmarks/rank_multiple.py --device cuda          # bf16, on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = "576x576,576x1536,1536x576,576x192"  # in x out: q/o, gate/up, down, k/v
MULTIPLES = (8, 16, 32, 64)


def ranks_for(in_f: int, out_f: int) -> list[tuple[str, int]]:
    """(labels, rank) for r and its roundings, each distinct rank once (r first)."""
    r = int(0.8 * in_f * out_f / (in_f + out_f))
    labels: dict[int, list[str]] = {r: ["r"]}
    for n in MULTIPLES:
        for label, rank in ((f"↓{n}", r - r % n), (f"↑{n}", -(-r // n) * n)):
            labels.setdefault(rank, []).append(label)
    return [(" ".join(labels[rank]), rank) for rank in [r, *sorted(set(labels) - {r})]]


class Pool:
    """Weights are views into one random buffer: filling fresh tensors per case would dominate."""

    def __init__(self, numel: int, device: str, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        self.buffer = torch.empty(numel).uniform_(-1, 1, generator=gen).to(device=device, dtype=dtype)

    def copies(self, shapes: list[tuple[int, int]], count: int) -> list[list[torch.Tensor]]:
        numel = sum(a * b for a, b in shapes)
        out, at = [], 0
        for _ in range(count):
            if at + numel > self.buffer.numel():
                at = 0  # wrap: fewer distinct copies than asked, still more bytes than the caches
            parts = []
            for a, b in shapes:
                parts.append(self.buffer[at : at + a * b].view(a, b))
                at += a * b
            out.append(parts)
        return out


def time_ms(weights: list[list[torch.Tensor]], x: torch.Tensor, sync, budget_s: float) -> float:
    """Median ms of one call, over passes through every copy (at least 3 passes, about `budget_s`)."""

    def one_pass():
        for parts in weights:
            y = x
            for w in parts:
                y = F.linear(y, w)

    one_pass()  # warm-up
    samples, spent = [], 0.0
    while len(samples) < 3 or (spent < budget_s and len(samples) < 50):
        sync()
        start = time.perf_counter()
        one_pass()
        sync()
        elapsed = time.perf_counter() - start
        samples.append(elapsed / len(weights) * 1e3)
        spent += elapsed
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated INxOUT")
    parser.add_argument("--rows", default="1,128", help="comma-separated rows of x")
    parser.add_argument("--copies", type=int, default=30, help="weight copies rotated through")
    parser.add_argument("--budget", type=float, default=0.1, help="seconds per timed case (at least 3 passes)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(v) for v in args.rows.split(",")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    largest = max(i * o for i, o in shapes)
    pool = Pool(args.copies * largest, args.device, dtype)
    where = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {str(dtype).removeprefix('torch.')}, {args.copies} weight copies\n")
    print("| in→out | rows | dense ms | rank | label | factored ms | ms / ms(r) | rank / r |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    start = time.perf_counter()
    with torch.inference_mode():
        for in_f, out_f in shapes:
            for n_rows in rows:
                x = torch.randn(n_rows, in_f, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
                dense = time_ms(pool.copies([(out_f, in_f)], args.copies), x, sync, args.budget)
                base = None
                for label, rank in ranks_for(in_f, out_f):
                    ms = time_ms(pool.copies([(rank, in_f), (out_f, rank)], args.copies), x, sync, args.budget)
                    base = base or (ms, rank)
                    print(f"| {in_f}→{out_f} | {n_rows} | {dense:.4f} | {rank} | {label} | {ms:.4f} | "
                          f"{ms / base[0]:.3f} | {rank / base[1]:.3f} |", flush=True)
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
