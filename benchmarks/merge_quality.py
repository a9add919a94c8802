"""A real merge: two specialists of builtin:smollm2-135m, merged by every method, scored on both domains.

1. `subspace adapt` fine-tunes the base twice (PiSSA, rank 16, the same budget), once on
   builtin:shakespeare and once on builtin:kjv, and writes each merged full checkpoint
   (`--merge`): the two specialists.
2. `subspace merge` merges them with each method, in its own process, with
   `--eval shakespeare=builtin:shakespeare --eval kjv=builtin:kjv` (held-out 5% of each), which
   also scores the base and both specialists. Normalised perplexity is a model's perplexity on a
   task divided by that task's specialist's (1 = specialist level), averaged over the two tasks.

    python benchmarks/merge_quality.py                 # specialists (once, cached in --work), then every method
    python benchmarks/merge_quality.py --only tsv,concrete
    python benchmarks/merge_quality.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "merge_quality.jsonl"
BASE = "builtin:smollm2-135m"
TASKS = {"shakespeare": "builtin:shakespeare", "kjv": "builtin:kjv"}
ADAPT = ["--method", "pissa", "--rank", "16", "--steps", "60", "--batch-size", "4", "--seqlen", "128",
         "--eval-every", "0", "--eval-rows", "16"]
# Each method at its defaults (mergekit's for the shared ones); ties / dare keep half of each task vector.
METHODS = {
    "linear": [],
    "task-arithmetic": [],
    "task-arithmetic:0.3": ["-O", "lambda=0.3"],  # concrete's inner merge at its λ, without the mask
    "ties": ["--density", "0.5"],
    "dare-ties": ["--density", "0.5"],
    "tsv": [],
    "iso-c": [],
    "iso-cts": [],
    "concrete": ["--data", TASKS["shakespeare"], "--data", TASKS["kjv"]],
}


def subspace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "subspace_cli", *args], capture_output=True, text=True)


def specialists(work: Path) -> list[Path]:
    paths = []
    for task, source in TASKS.items():
        out = work / f"specialist-{task}"
        if not (out / "merged" / "config.json").is_file():
            proc = subspace("adapt", BASE, "--data", source, "--out", str(out), "--merge", "--overwrite", "--quiet", *ADAPT)
            if proc.returncode != 0:
                sys.exit(f"adapt on {task} failed: {proc.stderr[-2000:]}")
        paths.append(out / "merged")
    return paths


def run_method(method: str, inputs: list[Path]) -> dict:
    evals = [arg for task, source in TASKS.items() for arg in ("--eval", f"{task}={source}")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subspace("merge", *map(str, inputs), "--base", BASE, "--method", method.split(":")[0],
                        "--out", f"{tmp}/out", "--json", "--quiet", *evals, *METHODS[method])
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    return {"method": method.split(":")[0], "args": METHODS[method], "adapt": ADAPT, "wall_s": wall,
            "timings_s": summary["timings_s"], "peak_rss_mb": summary["peak_rss_mb"],
            "perplexity": summary["merge"]["perplexity"], "normalised": summary["merge"]["normalised"],
            "specialists": summary["merge"]["specialists"]}


def table() -> str:
    latest: dict[tuple, dict] = {}  # a re-measured configuration replaces its earlier row, in first-seen order
    for line in RESULTS.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[(row["method"], tuple(row["args"]), tuple(row["adapt"]))] = row
    rows = list(latest.values())
    first = rows[0]
    names = {label: f"specialist: {task}" for task, label in first["specialists"].items()}
    out = ["| model | ppl Shakespeare | ppl KJV | mean ppl / specialist's | merge s | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|"]
    for label in ["base", *first["specialists"].values()]:
        ppl = first["perplexity"]
        out.append(f"| {names.get(label, label)} | {ppl['shakespeare'][label]:.2f} | {ppl['kjv'][label]:.2f} | "
                   f"{first['normalised'][label]:.3f} | – | – |")
    for r in rows:
        ppl = r["perplexity"]
        seconds = sum(v for k, v in r["timings_s"].items() if k != "evaluate")
        out.append(f"| `{r['method']}` {' '.join(r['args'][:2]) if r['method'] != 'concrete' else ''} | "
                   f"{ppl['shakespeare']['merged']:.2f} | {ppl['kjv']['merged']:.2f} | {r['normalised']['merged']:.3f} | "
                   f"{seconds:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subspace-merge-bench",
                        help="where the two specialists are written (reused when present)")
    parser.add_argument("--only", help="comma-separated methods (default: all)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    inputs = specialists(args.work)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for method in args.only.split(",") if args.only else METHODS:
        row = run_method(method, inputs)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("method", "normalised", "wall_s")}), flush=True)


if __name__ == "__main__":
    main()
