"""`subspace merge` against mergekit 0.1.5 on the same TIES merge of real-size checkpoints.

Inputs: builtin:smollm2-135m (fp32, 135M parameters) as the base and three variants of it: the
two specialists written by benchmarks/merge_quality.py (PiSSA on Shakespeare, on KJV; merged full
checkpoints) and their average. Both tools merge the same three into the same output (TIES,
density 0.5, weight 1, λ 1, fp32, tokenizer copied), each run in a fresh process, alternating
tools, --repeats times. Wall time counts the merge call only (imports excluded); peak RSS is the
process's maximum resident set (ru_maxrss), and "above start" subtracts what the process held
once its imports were done.

    python benchmarks/merge_quality.py --only linear   # once, if the specialists are not there yet
    python benchmarks/merge_speed.py                   # 3 repeats per tool, prints the table
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = "builtin:smollm2-135m"
DENSITY = 0.5


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_average(work: Path, base_dir: Path, a: Path, b: Path) -> Path:
    """A third variant: the mean of the two specialists, written like any checkpoint."""
    import shutil

    from subspace_cli.io.lazy_checkpoint import LazyCheckpoint
    from subspace_cli.io.sharded_writer import ShardedWriter

    out = work / "variant-average"
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with LazyCheckpoint(a) as ca, LazyCheckpoint(b) as cb:
        writer = ShardedWriter(out, 5 * 10**9)
        for name in ca.names():
            writer.add(name, (ca.get(name) + cb.get(name)) / 2)
        writer.finish()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
    return out


def run_tool(tool: str, base: Path, variants: list[Path], out: Path) -> dict:
    if tool == "subspace":
        from subspace_cli.pipelines.merge import run_merge
        from subspace_cli.pipelines.merge_config import MergeConfig

        config = MergeConfig(models=[str(v) for v in variants], base=str(base), method="ties", density=[DENSITY],
                             out=str(out), shard_size="5GB")
        start_rss = _rss_mb()
        start = time.perf_counter()
        run_merge(config)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        config = MergeConfiguration.model_validate({
            "merge_method": "ties", "base_model": str(base), "dtype": "float32",
            "parameters": {"normalize": True, "lambda": 1.0},
            "models": [{"model": str(v), "parameters": {"weight": 1.0, "density": DENSITY}} for v in variants]})
        start_rss = _rss_mb()
        start = time.perf_counter()
        run_merge(config, str(out), MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True))
    return {"tool": tool, "wall_s": time.perf_counter() - start, "peak_rss_mb": _rss_mb(), "start_rss_mb": start_rss}


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def tensors(path):
        out = {}
        for file in sorted(path.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subspace-merge-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help="(internal) run one tool and print its JSON row")
    parser.add_argument("--out", type=Path, help="(internal) output directory of --one")
    args = parser.parse_args()
    from subspace_cli.io.models import resolve_model_path

    base = resolve_model_path(BASE)
    specialists = [args.work / f"specialist-{task}" / "merged" for task in ("shakespeare", "kjv")]
    if not all((s / "config.json").is_file() for s in specialists):
        sys.exit("no specialists in --work: run `python benchmarks/merge_quality.py --only linear` first")
    variants = [*specialists, make_average(args.work, base, *specialists)]
    if args.one:
        print(json.dumps(run_tool(args.one, base, variants, args.out)))
        return
    rows: dict[str, list[dict]] = {"subspace": [], "mergekit": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for tool in rows:  # alternating, so drift hits both
                out = Path(tmp) / f"{tool}-{repeat}"
                proc = subprocess.run([sys.executable, __file__, "--one", tool, "--out", str(out), "--work", str(args.work)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{tool} failed: {proc.stderr[-3000:]}")
                rows[tool].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        difference = max_difference(Path(tmp) / "subspace-0", Path(tmp) / "mergekit-0")
    med = {tool: {key: statistics.median(r[key] for r in runs) for key in ("wall_s", "peak_rss_mb", "start_rss_mb")}
           for tool, runs in rows.items()}
    print(f"TIES, density {DENSITY}, base + 3 variants of SmolLM2-135M (fp32); median of {args.repeats} runs per tool\n")
    print("| tool | wall s | peak RSS MiB | RSS above start MiB |")
    print("|---|---:|---:|---:|")
    for tool, m in med.items():
        print(f"| {tool} | {m['wall_s']:.1f} | {m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] - m['start_rss_mb']:.0f} |")
    s, k = med["subspace"], med["mergekit"]
    print(f"| subspace / mergekit | {s['wall_s'] / k['wall_s']:.2f}× | {s['peak_rss_mb'] / k['peak_rss_mb']:.2f}× | "
          f"{(s['peak_rss_mb'] - s['start_rss_mb']) / (k['peak_rss_mb'] - k['start_rss_mb']):.2f}× |")
    print(f"\nmax |subspace − mergekit| over all tensors: {difference:.1e}")
    print("runs:", json.dumps(rows))


if __name__ == "__main__":
    main()
