"""Quality protocol for `subspace compress` on builtin:smollm2-135m (fp32, CPU).

Calibration: 64 × 256 tokens from the first 95% of the concatenated plays (builtin:shakespeare).
Score: perplexity over non-overlapping 512-token windows of the first 40,000 characters of the
last 5% of the plays, and of the last 5% of KJV verses (cross-domain).

Each configuration runs in its own process, so wall time and peak RSS are its own. Results are
appended to a JSON-lines file and rendered as a Markdown table:

    python benchmarks/compress_quality.py --grid            # the methods × allocation × ratio grid
    python benchmarks/compress_quality.py --remedies        # cross-domain remedies at 20%
    python benchmarks/compress_quality.py --cospadi         # cospadi vs svd-llm, Shakespeare calibration
    python benchmarks/compress_quality.py --table           # print the Markdown tables
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compress_quality.jsonl"
MODEL = "builtin:smollm2-135m"
EVALS = ["builtin:shakespeare", "builtin:kjv"]
# The full grid is every method × allocation × ratio; the baselines far off the scale (svd, asvd:
# perplexity above 10^3) were run at fewer ratios to fit one session on 2 cores.
RATIOS = {"svd-llm": (0.1, 0.2, 0.3, 0.4), "svd": (0.2, 0.4), "asvd": (0.2,)}
GRID = [(m, a, r) for m in ("svd-llm", "asvd", "svd") for a in ("global", "uniform") for r in RATIOS[m]]
REMEDIES = [
    {"label": "shrinkage 0.1", "options": {"shrinkage": 0.1}},
    {"label": "mixed shakespeare+kjv", "calib": ["builtin:shakespeare", "builtin:kjv"]},
    {"label": "self", "calib": ["self"]},
]
# cospadi against svd-llm: same protocol, same ratio, same (byte) accounting, side by side.
SHAKESPEARE_ONLY = {"calib": ["builtin:shakespeare"]}
COSPADI = [{"method": m, "ratio": r, "label": f"{m} {r:.0%}", **SHAKESPEARE_ONLY, **o}
           for r in (0.2, 0.3)
           for m, o in (("svd-llm", {}), ("cospadi", {}))]
# Re-running OMP during the fit (recode_every) is compared per matrix by cospadi_schedule.py.
COSPADI_VARIANTS = [
    {"method": "cospadi", "ratio": 0.2, "label": "cospadi 20% 2:4", "structure": "2:4", **SHAKESPEARE_ONLY},
    {"method": "cospadi", "ratio": 0.2, "label": "cospadi 20% group_size=2", "options": {"group_size": 2}, **SHAKESPEARE_ONLY},
]
# svd is data-free: without calibration it needs no activation pass at all.
DATA_FREE = {"svd": {"calib": []}}


def run_one(spec: dict) -> dict:
    """Compress with `spec` (CompressConfig fields), then score both held-out sets."""
    import torch

    from subspace_cli.evaluate.perplexity import perplexity
    from subspace_cli.io import data
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.pipelines.compress import run_compress
    from subspace_cli.pipelines.compress_config import CompressConfig
    from subspace_cli.report.resources import peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        result = {"spec": spec}
        if spec.get("method") != "dense":
            config = CompressConfig(model=MODEL, out=f"{tmp}/out", skip_eval=True, **spec)
            start = time.perf_counter()
            report = run_compress(config)
            result["compress_s"] = time.perf_counter() - start
            result["peak_rss_mb"] = peak_rss_mb()
            result["ratio_removed"] = report.params.targeted_ratio_removed
            result["stages_s"] = report.timings_s
            compared = [m for m in report.matrices if m.reference_rel_error is not None]
            if compared:
                result["matrices_at_or_below_svd_llm"] = [
                    sum(m.whitened_rel_error <= m.reference_rel_error for m in compared), len(compared)]
            model = load_model_and_tokenizer(f"{tmp}/out").model
        else:
            model = load_model_and_tokenizer(MODEL).model
        tokenizer = load_model_and_tokenizer(MODEL, with_tokenizer=True).tokenizer
        torch.manual_seed(0)
        for source in EVALS:
            windows = data.eval_windows(tokenizer, data.load_heldout(source), 512, 40000)
            result[source] = perplexity(model, windows, batch_size=4)["ppl"]
    return result


def launch(spec: dict) -> None:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"FAILED {spec}: {proc.stderr[-2000:]}", file=sys.stderr)
        return
    line = proc.stdout.strip().splitlines()[-1]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(line + "\n")
    print(line, flush=True)


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    dense = next((r for r in rows if r["spec"].get("method") == "dense"), None)
    out = []
    if dense:
        out.append(f"Dense: Shakespeare {dense['builtin:shakespeare']:.1f}, KJV {dense['builtin:kjv']:.1f}\n")
    out.append("| method | allocation | ratio | removed | ppl Shakespeare | ppl KJV | compress s | peak RSS MiB |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["spec"]
        if s.get("method") == "dense" or "label" in s:
            continue
        out.append(f"| {s['method']} | {s.get('allocation', 'global')} | {s['ratio']:.0%} | {r['ratio_removed']:.1%} | "
                   f"{_ppl(r['builtin:shakespeare'])} | {_ppl(r['builtin:kjv'])} | {r['compress_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    remedies = [r for r in rows if "label" in r["spec"] and r["spec"]["label"] in {x["label"] for x in REMEDIES}]
    if remedies:
        out += ["", "| calibration remedy (svd-llm, 20%) | ppl Shakespeare | ppl KJV | compress s |", "|---|---:|---:|---:|"]
        for r in remedies:
            out.append(f"| {r['spec']['label']} | {_ppl(r['builtin:shakespeare'])} | {_ppl(r['builtin:kjv'])} | {r['compress_s']:.0f} |")
    dictionary = [r for r in rows if "label" in r["spec"] and r["spec"]["label"] not in {x["label"] for x in REMEDIES}]
    if dictionary:
        out += ["", "| method (calibration: Shakespeare) | removed | ppl Shakespeare | ppl KJV | matrices ≤ svd-llm error "
                "| compress s | of which OMP / K-SVD s | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in dictionary:
            wins = r.get("matrices_at_or_below_svd_llm")
            stages = r["stages_s"]
            fit = (f"{stages['compress.coding']:.0f} / {stages['compress.update']:.0f}"
                   if "compress.coding" in stages else "–")
            out.append(f"| {r['spec']['label']} | {r['ratio_removed']:.1%} | {_ppl(r['builtin:shakespeare'])} | "
                       f"{_ppl(r['builtin:kjv'])} | {f'{wins[0]} / {wins[1]}' if wins else '–'} | "
                       f"{r['compress_s']:.0f} | {fit} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def _ppl(x: float) -> str:
    return f"{x:.3g}" if x >= 1e4 else f"{x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help="(internal) run one JSON spec and print its result")
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--remedies", action="store_true")
    parser.add_argument("--cospadi", action="store_true")
    parser.add_argument("--cospadi-variants", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--only", default=None, help="restrict the grid to one method")
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        label = spec.pop("label", None)
        result = run_one(spec)
        if label:
            result["spec"]["label"] = label
        print(json.dumps(result))
        return
    if args.grid and not args.only:
        launch({"method": "dense"})
    if args.grid:
        for method, allocation, ratio in GRID:
            if args.only and method not in args.only.split(","):
                continue
            launch({"method": method, "allocation": allocation, "ratio": ratio, **DATA_FREE.get(method, {})})
    if args.remedies:
        for remedy in REMEDIES:
            launch({"method": "svd-llm", "ratio": 0.2, **remedy})
    if args.cospadi:
        for spec in COSPADI:
            launch(spec)
    if args.cospadi_variants:
        for spec in COSPADI_VARIANTS:
            launch(spec)
    if args.table:
        print(table())


if __name__ == "__main__":
    main()
