"""Every adapt method on builtin:smollm2-135m, trained on builtin:kjv for the same short budget.

Each method runs `run_adapt` in its own process (so peak RSS is its own), one at a time, with
the same data, steps, batch, rank and schedule; the learning rate is each method's default
(`subspace methods NAME`). Held-out perplexity is scored on the first 32 held-out KJV windows
(the last 5% of the text, never trained on) before and after training.

    python benchmarks/adapt_quality.py            # all methods, appends benchmarks/results/adapt_quality.jsonl
    python benchmarks/adapt_quality.py --only lora,dora
    python benchmarks/adapt_quality.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "adapt_quality.jsonl"
BUDGET = dict(model="builtin:smollm2-135m", data=["builtin:kjv"], rank=16, steps=40, batch_size=4, seqlen=128,
              warmup_steps=4, eval_every=0, eval_rows=32)


def run_one(method: str) -> dict:
    from subspace_cli.methods.catalog import methods_for
    from subspace_cli.pipelines.adapt import run_adapt
    from subspace_cli.pipelines.adapt_config import AdaptConfig
    from subspace_cli.report.resources import peak_rss_mb

    assert method in methods_for("adapt")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = run_adapt(AdaptConfig(method=method, out=f"{tmp}/out", **BUDGET))
        wall = time.perf_counter() - start
    ppl = report.perplexity["held-out"]
    return {"method": method, "budget": BUDGET, "trainable_params": report.training.trainable_params,
            "lr": report.training.lr, "ppl_before": ppl.before, "ppl_after": ppl.after,
            "train_s": report.training.seconds, "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
            "export_ranks": sorted({a.export_rank for a in report.adapters})}


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    out = ["| method | trainable params | lr | held-out ppl before | after | train s | total s | peak RSS MiB | exported LoRA rank |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['trainable_params']:,} | {r['lr']:g} | {r['ppl_before']:.2f} | "
                   f"{r['ppl_after']:.2f} | {r['train_s']:.0f} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                   f"{', '.join(map(str, r['export_ranks']))} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help="(internal) run one method and print its JSON row")
    parser.add_argument("--only", help="comma-separated methods (default: all)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if args.table:
        print(table())
        return
    from subspace_cli.methods.catalog import methods_for

    methods = args.only.split(",") if args.only else list(methods_for("adapt"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        proc = subprocess.run([sys.executable, __file__, "--one", method], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAILED {method}: {proc.stderr[-2000:]}", file=sys.stderr)
            continue
        line = proc.stdout.strip().splitlines()[-1]
        with RESULTS.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


if __name__ == "__main__":
    main()
