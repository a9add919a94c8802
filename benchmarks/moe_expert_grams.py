"""MoE experts: svd-llm with per-expert (routed) Grams against pooled Grams, on a tiny trained Mixtral.

No real small MoE is available offline, so this script trains one: a character-level Mixtral
(hidden 64, 4 blocks, 8 experts with intermediate 128, top-2; 0.85 M parameters) for 1000 AdamW
steps of 16 × 128 characters on the first 95% of builtin:shakespeare, without the load-balancing
loss, so routing ends far from uniform. The model is cached under $SUBSPACE_HOME/benchmarks/
(built once).

It is then compressed by `svd-llm` (calibration 128 × 128 characters of Shakespeare, the
training length; several calibration seeds), each expert's matrices fitted with

- routed: the Gram of the tokens routed to that expert, rows weighted by routing weight (default);
- routed, unweighted: the same tokens, each counted once;
- pooled (`-O expert_grams=pooled`): the Gram of all the layer's tokens, as if every token went
  to every expert;

and scored by the verb's own held-out perplexity (the last 5% of the plays, 40,000 characters in
128-character windows).

    OMP_NUM_THREADS=1 python benchmarks/moe_expert_grams.py                      # all matrices, global
    OMP_NUM_THREADS=1 python benchmarks/moe_expert_grams.py --targets experts --allocation uniform

(one thread: on a shared 2-core machine two threads oversubscribe and training runs 6× slower).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STEPS, BATCH, SEQLEN, LR = 1000, 16, 128, 3e-3
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
VARIANTS = {"routed": ({}, True), "routed, unweighted": ({}, False), "pooled": ({"expert_grams": "pooled"}, True)}


def trained_model() -> Path:
    """The trained tiny Mixtral's directory, built once under $SUBSPACE_HOME/benchmarks."""
    from subspace_cli.io.home import build_once, subspace_home

    target = subspace_home() / "benchmarks" / f"tiny-mixtral-shakespeare-{STEPS}"
    return build_once(target, _train)


def _train(directory: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from subspace_cli.io.data import load_text, split_holdout
    from tiny_models import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    pool, _ = split_holdout(load_text("builtin:shakespeare"))  # the held-out 5% is never trained on
    ids = torch.tensor(tokenizer(pool, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(STEPS):
        for group in optimizer.param_groups:  # warm-up 20 steps, then cosine to 10%
            group["lr"] = LR * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * step / STEPS))
        starts = torch.randint(0, ids.numel() - SEQLEN - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[s:s + SEQLEN] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def compress(model: Path, seed: int, options: dict, weighted: bool, **config) -> dict:
    from subspace_cli.pipelines import expert_grams
    from subspace_cli.pipelines.compress import run_compress
    from subspace_cli.pipelines.compress_config import CompressConfig

    expert_grams.ROUTING_WEIGHTED = weighted
    with tempfile.TemporaryDirectory() as tmp:
        report = run_compress(CompressConfig(model=str(model), out=f"{tmp}/out", method="svd-llm",
                                             calib=["builtin:shakespeare"], calib_samples=128, calib_seqlen=SEQLEN,
                                             eval_seqlen=SEQLEN, seed=seed, options=options, **config))
    expert_grams.ROUTING_WEIGHTED = True
    return {"report": report, "before": report.perplexity["builtin:shakespeare"].before,
            "after": report.perplexity["builtin:shakespeare"].after}


def routing_table(report) -> list[str]:
    """Per layer, each expert's share of the routed calibration tokens (uniform would be 12.5%)."""
    lines = ["| block | token share per expert (0..7) | max / min |", "|---:|---|---:|"]
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts.gate_up_proj."
        counts = [m.tokens for m in report.matrices if m.name.startswith(prefix)]
        total = sum(counts)
        shares = " ".join(f"{c / total:.1%}" for c in counts)
        lines.append(f"| {layer} | {shares} | {max(counts) / max(min(counts), 1):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--allocation", default="global", choices=["global", "uniform"])
    parser.add_argument("--targets", default=None, help="e.g. 'experts' to compress the experts only")
    args = parser.parse_args()
    config = {"ratio": args.ratio, "allocation": args.allocation, "targets": args.targets}
    model = trained_model()
    rows, first = {}, None
    for name, (options, weighted) in VARIANTS.items():
        for seed in args.seeds:
            start = time.perf_counter()
            result = compress(model, seed, options, weighted, **config)
            print(f"{name} seed {seed}: {result['before']:.3f} -> {result['after']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            rows.setdefault(name, []).append(result["after"])
            first = first or result
    print(f"Dense held-out perplexity: {first['before']:.3f}\n")
    print("\n".join(routing_table(first["report"])) + "\n")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    what = f"svd-llm {args.ratio:.0%}, {args.allocation}" + (f", --targets {args.targets}" if args.targets else "")
    print(f"| expert Grams ({what}) | {seeds} | mean |")
    print("|---|" + "---:|" * (len(args.seeds) + 1))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | **{sum(values) / len(values):.3f}** |")


if __name__ == "__main__":
    main()
