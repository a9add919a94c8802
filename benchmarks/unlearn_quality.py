"""Unlearning KJV from builtin:smollm2-135m while keeping Shakespeare: ga, grad-diff, rmu, sspu side by side.

Forget: 64 fixed windows of 128 tokens sampled (seed 0) from the first 95% of builtin:kjv; retain:
64 windows of builtin:shakespeare. Held-out perplexity on the last 5% of each (never trained on),
and loss-based membership AUC of the forget windows against held-out KJV windows. Each method
runs `subspace unlearn` in its own process (so time and peak RSS are its own) at its defaults
plus the options below.

    python benchmarks/unlearn_quality.py            # every method, appends benchmarks/results/unlearn_quality.jsonl
    python benchmarks/unlearn_quality.py --only rmu -O steering_scale=8
    python benchmarks/unlearn_quality.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "unlearn_quality.jsonl"
MODEL = "builtin:smollm2-135m"
DATA = ["--forget", "builtin:kjv", "--retain", "builtin:shakespeare"]
METHODS = {"ga": [], "grad-diff": [], "rmu": [], "sspu": []}


def run(method: str, options: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "subspace_cli", "unlearn", MODEL, "--method", method, *DATA,
                               "--out", f"{tmp}/out", "--json", "--quiet", *options], capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: {proc.stderr[-2000:]}")
    s = json.loads(proc.stdout)
    u = s["unlearn"]
    return {"method": method, "args": options, "wall_s": wall, "timings_s": s["timings_s"], "peak_rss_mb": s["peak_rss_mb"],
            "forget": s["perplexity"]["forget"], "retain": s["perplexity"]["retain"],
            "mia_before": u["mia_auc_before"], "mia_after": u["mia_auc_after"], "options": s["options"],
            "diagnostics": u["diagnostics"], "changed": len(u["changed"])}


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    out = ["| method | options | forget ppl before → after | × | retain ppl before → after | × | MIA AUC before → after | unlearn s | total s | peak RSS MiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, t = r["forget"], r["retain"]
        given = ' '.join(a for a in r['args'] if a != '-O') or 'defaults'
        out.append(f"| {r['method']} | {given} (lr {r['options']['lr']:g}) | "
                   f"{f['before']:.1f} → {f['after']:.1f} | {f['ratio']:.1f} | {t['before']:.2f} → {t['after']:.2f} | "
                   f"{t['ratio']:.3f} | {r['mia_before']:.2f} → {r['mia_after']:.2f} | {r['timings_s']['unlearn']:.0f} | "
                   f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated methods (default: all)")
    parser.add_argument("-O", dest="options", action="append", default=[], help="extra method option KEY=VALUE")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for method in args.only.split(",") if args.only else METHODS:
        options = [*METHODS[method], *(x for o in args.options for x in ("-O", o))]
        row = run(method, options)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("method", "args", "forget", "retain", "mia_after", "wall_s")}), flush=True)


if __name__ == "__main__":
    main()
