"""Speed of a sparse-dictionary layer (CoSpaDi) against dense and low-rank at equal stored bytes.

For SmolLM2-135M-like shapes (out, in) at compression ratio 0.2 and k/s = 2, times one forward
call of: the dense nn.Linear, LowRankLinear at the rank that stores the same bytes as the
dictionary, DictionaryLinear on its torch path (S scattered to [out, k], one GEMM), and, on CUDA
only, DictionaryLinear opted in to the `subspace::packed_product` op (`use_packed_product`: the
autotuned Triton kernel, tuned by an untimed first call; the interpreter is never timed).
Batches of 1 and 64 rows; fp32 on CPU, fp32 and bf16 on CUDA. All sides run in one process with
random weights (speed does not depend on their values).

Storage, in 16-bit units (subspace_cli.linalg.dictionary_budget): k·in + s·out + P/2, P the
smaller of int16 indices (2·s·out bytes) and a bitmask (out·⌈k/8⌉ bytes); low rank costs
r·(in + out). k is the largest even number whose cost ≤ (1 − ratio)·in·out, s = k/2, and r the
largest rank with r·(in + out) ≤ the dictionary's cost.

    python benchmarks/dictionary_kernel.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from subspace_cli.kernels.packed_product import (
    packed_product_kernel,
    use_packed_product,
)
from subspace_cli.linalg.dictionary_budget import DictionarySize, position_bytes
from subspace_cli.modules.lowrank import dictionary_from_factors
from subspace_cli.modules.remote_modeling import LowRankLinear, scatter_product

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (out, in): attention q/o, MLP up/gate, MLP down
BATCHES = (1, 64)
RATIO = 0.2
K_OVER_S = 2


def sizes(out_f: int, in_f: int) -> tuple[DictionarySize, float, int]:
    """(dictionary size, its cost, rank) for the budget (1 − RATIO)·in·out."""
    budget = (1 - RATIO) * in_f * out_f

    def size(k):
        return DictionarySize(k, k // K_OVER_S, position_bytes(out_f, k, k // K_OVER_S)[0])

    k = 2
    while size(k + 2).params(in_f, out_f) <= budget:
        k += 2
    cost = size(k).params(in_f, out_f)
    return size(k), cost, int(cost // (in_f + out_f))


def build(out_f: int, in_f: int, size: DictionarySize, rank: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    k, s = size.atoms, size.nonzeros

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    dense = nn.Linear(in_f, out_f, dtype=dtype, device=device)
    lowrank = LowRankLinear.from_factors(randn(out_f, rank), randn(rank, in_f), randn(out_f))
    indices = torch.rand(out_f, k, generator=g).argsort(1)[:, :s].sort(1).values.to(device)
    dictionary = dictionary_from_factors(randn(k, in_f), randn(out_f, s), indices, randn(out_f),
                                               positions=size.positions)
    return [m.requires_grad_(False) for m in (dense, lowrank, dictionary)]


def median_ms(module, x) -> float:
    timer = benchmark.Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = packed_product_kernel if device == "cuda" else None  # None without triton
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, ratio {RATIO}, "
          f"k/s = {K_OVER_S}")
    if kernel is None:
        print("Triton kernel: skipped (needs CUDA and triton; the CPU interpreter is not timed)")
    rows = []
    for out_f, in_f in SHAPES:
        size, cost, rank = sizes(out_f, in_f)
        for dtype in dtypes:
            dense, lowrank, dictionary = build(out_f, in_f, size, rank, dtype, device)
            for batch in BATCHES:
                x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
                row = {"out": out_f, "in": in_f, "atoms": size.atoms, "nonzeros": size.nonzeros,
                       "positions": size.positions, "rank": rank, "dictionary_cost": cost,
                       "lowrank_cost": rank * (in_f + out_f), "dense_cost": in_f * out_f, "batch": batch,
                       "dtype": str(dtype).removeprefix("torch."), "device": device,
                       "dense_ms": median_ms(dense, x), "lowrank_ms": median_ms(lowrank, x),
                       "dictionary_torch_ms": median_ms(dictionary, x), "dictionary_triton_ms": None}
                if kernel is not None:
                    with torch.no_grad():
                        y_torch = dictionary(x).float()
                    assert use_packed_product(dictionary)  # this instance only
                    with torch.no_grad():
                        y_kernel = dictionary(x).float()  # also runs the autotuner for this shape
                    row["dictionary_triton_ms"] = median_ms(dictionary, x)
                    dictionary.product = scatter_product  # back to the torch path for the next batch
                    row["triton_vs_torch_rel"] = float((y_kernel - y_torch).norm() / y_torch.norm())
                rows.append(row)
                print(f"  {out_f}x{in_f} {row['dtype']} batch {batch}: done", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def ms(v):
        return "–" if v is None else f"{v:.4f}"

    def vs(v, dense):
        return "–" if v is None else f"{v / dense:.2f}"

    lines = ["| out×in | k / s / r | dtype | batch | dense ms | low-rank ms | dict torch ms | dict Triton ms "
             "| low-rank/dense | dict torch/dense | dict Triton/dense |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["dense_ms"]
        lines.append(f"| {r['out']}×{r['in']} | {r['atoms']} / {r['nonzeros']} / {r['rank']} | {r['dtype']} "
                     f"| {r['batch']} | {ms(d)} | {ms(r['lowrank_ms'])} | {ms(r['dictionary_torch_ms'])} "
                     f"| {ms(r['dictionary_triton_ms'])} | {vs(r['lowrank_ms'], d)} "
                     f"| {vs(r['dictionary_torch_ms'], d)} | {vs(r['dictionary_triton_ms'], d)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = run()
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
