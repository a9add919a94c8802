"""rmu and sspu on every architecture of the test matrix (issue 16): forget KJV, keep Shakespeare.

A random tiny model knows nothing, so "holding retain" means nothing on it. Each architecture of
tests/tiny_architectures.py is therefore first trained here, with a plain torch loop, on the
first 95% of builtin:shakespeare and builtin:kjv (mixed 50/50, the character tokenizer of
tests/tiny_models.py, hidden 64, 4 blocks, 400 steps of 16 × 128 characters), and cached under
$SUBSPACE_HOME/bench/unlearn-arch (never in the repository). Then, in this one process (the data
is the same for every model: same tokenizer), the unlearn verb's own steps (`_Sets`, the method's
build, `train_plan`, perplexity on the held-out last 5% of each corpus, 20,000 characters) run:

* `defaults`: the method at its defaults (sized for SmolLM2-135M: block n/4 = 1, 60 steps);
* a sweep of retain_weight α at one recipe for all tiny models (steer block 2 of 4, blocks 0–2
  train, 200 steps; rmu lr 3e-3, sspu lr 1e-2), with the architecture-aware targets and steering
  scale; on the post-norm architectures also with the pre-issue-16 choice (`modules=mlp\\.down_proj`,
  `steering_norm=mean`). The table gives, per row, the largest forget ratio whose retain ratio is
  at most 1.10, and the α that gave it.

    python benchmarks/unlearn_architectures.py                 # train (cached) + every run, appends results
    python benchmarks/unlearn_architectures.py --only gemma3,olmo2 --methods rmu
    python benchmarks/unlearn_architectures.py --train-only
    python benchmarks/unlearn_architectures.py --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

RESULTS = Path(__file__).parent / "results" / "unlearn_architectures.jsonl"
DATA = ["--forget", "builtin:kjv", "--retain", "builtin:shakespeare"]
POST_NORM = ("gemma2", "gemma3", "olmo2")
# Model and training recipe; the cache key hashes it, so a change retrains.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
TRAIN = dict(steps=400, batch=16, seqlen=128, lr=3e-3, seed=0)
# The choice before issue 16: down_proj only, c = scale × the mean forget-token norm of h_l.
OLD = {"modules": r"mlp\.down_proj", "steering_norm": "mean"}
RECIPE = {"rmu": {"layer": 2, "steps": 200, "lr": 3e-3}, "sspu": {"layer": 2, "steps": 200, "lr": 1e-2}}
ALPHAS = {"rmu": [10, 15, 20, 25, 30, 50], "sspu": [10, 20, 30, 50, 100]}
RETAIN_BAR = 1.10


def _overrides(name: str) -> dict:
    extra = dict(SHAPE)
    if name in ("qwen3", "gemma2", "gemma3"):
        extra["head_dim"] = 16
    if name == "gemma3":
        extra["layer_types"] = ["sliding_attention", "full_attention"] * 2
    if name == "qwen2_moe":
        extra.update(moe_intermediate_size=64, shared_expert_intermediate_size=64)
    return extra


def cache_dir(name: str) -> Path:
    from subspace_cli.io.home import subspace_home

    key = hashlib.sha256(json.dumps([name, _overrides(name), TRAIN], sort_keys=True).encode()).hexdigest()[:10]
    return subspace_home() / "bench" / "unlearn-arch" / f"{name}-{key}"


def _token_pool(tokenizer, spec: str) -> torch.Tensor:
    from subspace_cli.io.data import load_text, split_holdout, tokenize_text

    return tokenize_text(tokenizer, split_holdout(load_text(spec))[0])  # the first 95%: never the held-out tail


def train(name: str) -> Path:
    """Train (or reuse) the tiny `name` model on Shakespeare + KJV; returns its directory."""
    import transformers

    from tiny_architectures import ARCHITECTURES, tiny_config
    from tiny_models import _save, make_char_tokenizer

    out = cache_dir(name)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(TRAIN["seed"])
    model = getattr(transformers, ARCHITECTURES[name][1])(tiny_config(name, **_overrides(name)))
    tokenizer = make_char_tokenizer()
    pools = [_token_pool(tokenizer, "builtin:shakespeare"), _token_pool(tokenizer, "builtin:kjv")]
    g = torch.Generator().manual_seed(TRAIN["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    steps, batch, seqlen = TRAIN["steps"], TRAIN["batch"], TRAIN["seqlen"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    model.train()
    began = time.perf_counter()
    for step in range(steps):
        rows = []
        for i in range(batch):  # half Shakespeare, half KJV
            pool = pools[i % 2]
            start = int(torch.randint(0, pool.numel() - seqlen, (1,), generator=g))
            rows.append(pool[start:start + seqlen])
        ids = torch.stack(rows)  # [B, L]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"{name} step {step + 1} loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    _save(model, tmp)
    tmp.rename(out)
    return out


def score(model_dir: Path, method: str, options: dict, sets, base: dict) -> dict:
    from subspace_cli.evaluate.perplexity import perplexity
    from subspace_cli.methods.catalog import get_method
    from subspace_cli.modules.loading import load_model
    from subspace_cli.pipelines import unlearn

    start = time.perf_counter()
    model = load_model(str(model_dir)).eval()
    registered = get_method("unlearn", method)
    config = registered.make_config(options)
    plan = registered.plan(model, sets.train, config, torch.Generator().manual_seed(0))
    model.train(False)
    curve = unlearn.train_plan(plan, config, sets.train, 0)
    plan.finish()
    for p in model.parameters():
        p.requires_grad_(False)
    after = {k: perplexity(model, w, batch_size=8)["ppl"] for k, w in (("forget", sets.forget_eval), ("retain", sets.retain_eval))}
    d = plan.diagnostics
    return {"method": method, "options": options, "forget_ratio": after["forget"] / base["forget"],
            "retain_ratio": after["retain"] / base["retain"], "forget_after": after["forget"], "retain_after": after["retain"],
            "targets": [t["name"] for t in d["targets"]], "steps_k": [t["step"] for t in d["targets"]],
            "steering_coef": d["steering_coef"], "steering_norm": d.get("steering_norm"),
            "forget_mse": [curve[0]["forget_mse"], curve[-1]["forget_mse"]], "seconds": time.perf_counter() - start}


def run_arch(name: str, methods: list[str], sets) -> list[dict]:
    from subspace_cli.evaluate.perplexity import perplexity
    from subspace_cli.modules.loading import load_model

    model_dir = train(name)
    dense = load_model(str(model_dir)).eval()
    with torch.no_grad():
        base = {k: perplexity(dense, w, batch_size=8)["ppl"] for k, w in (("forget", sets.forget_eval), ("retain", sets.retain_eval))}
    del dense
    rows = []
    for method in methods:
        runs = [("defaults", {})]
        for choice in ("architecture-aware", "pre-issue-16") if name in POST_NORM else ("architecture-aware",):
            runs += [(choice, {**RECIPE[method], "retain_weight": alpha, **(OLD if choice == "pre-issue-16" else {})})
                     for alpha in ALPHAS[method]]
        for label, options in runs:
            row = {"arch": name, "run": label, "base": base, **score(model_dir, method, options, sets, base)}
            print(json.dumps({k: row[k] for k in ("arch", "method", "run", "options", "forget_ratio", "retain_ratio")}),
                  flush=True)
            rows.append(row)
    return rows


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["method"], r["run"]), []).append(r)
    out = ["| architecture | method | run | trained (block 0) | forget ppl × | retain ppl × | α | steering MSE first → last |",
           "|---|---|---|---|---:|---:|---:|---:|"]
    for (arch, method, run), group in groups.items():
        held = [r for r in group if r["retain_ratio"] <= RETAIN_BAR]
        best = max(held, key=lambda r: r["forget_ratio"]) if held else min(group, key=lambda r: r["retain_ratio"])
        trained = ", ".join(t.split(".", 3)[-1].rsplit(".", 1)[0] for t in best["targets"] if ".layers.0." in t)
        alpha = best["options"].get("retain_weight", "default")
        mark = "" if held else " (none ≤ 1.10)"
        out.append(f"| {arch} | {method} | {run}{mark} | {trained} | {best['forget_ratio']:.2f} | "
                   f"{best['retain_ratio']:.3f} | {alpha} | {best['forget_mse'][0]:.3g} → {best['forget_mse'][1]:.3g} |")
    return "\n".join(out)


def main() -> None:
    from tiny_architectures import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated architectures (default: all of tests/tiny_architectures.py)")
    parser.add_argument("--methods", default="rmu,sspu")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    for name in names:
        print(f"{name}: {train(name)}", file=sys.stderr, flush=True)
    if args.train_only:
        return
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.pipelines import unlearn
    from subspace_cli.pipelines.unlearn_config import UnlearnConfig

    first = str(cache_dir(names[0]))  # every model has the same character tokenizer, so one data set serves all
    config = UnlearnConfig(model=first, out="unused", forget="builtin:kjv", retain="builtin:shakespeare")
    sets = unlearn._Sets(config, load_model_and_tokenizer(first).tokenizer)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        for row in run_arch(name, args.methods.split(","), sets):
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
