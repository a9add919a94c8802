"""Peak memory of perplexity with a 262144-token vocabulary: chunked logits vs whole-batch logits.

A tiny Llama (hidden 64, 2 blocks, tied embeddings, vocab 262144: 17M parameters, 64 MiB) is
written once; then every (path, batch, seqlen, chunk) configuration runs in its own fresh Python
process, which loads the model, does one warm-up forward on 2 tokens, reads its RSS (`base`), scores
one batch of `batch` windows of `seqlen` tokens and reports its peak RSS (ru_maxrss). `peak − base`
is what scoring added. Paths:

- full: the computation before chunking, `causal_logits` (the batch's [b, L, V] logits) then
  `nll_sum` (float32 one window at a time), both still in subspace_cli.evaluate.perplexity;
- chunked: `perplexity(..., chunk=C)` (C = positions per chunk; `default` = from the 64 MiB budget).

    python benchmarks/logits_memory.py                 # the table in benchmarks/RESULTS.md
    python benchmarks/logits_memory.py --quick         # two small configurations

The full path at batch 8 × 512 tokens needs ~5 GiB and the one-chunk row of the sweep ~9 GiB; run it
on a machine with that free.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 262144
MIB = 2**20


def build(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / MIB


def child(args) -> None:
    """One configuration in this process; prints one JSON line."""
    import resource

    import torch
    import transformers

    from subspace_cli.evaluate.perplexity import causal_logits, nll_sum, perplexity

    torch.set_num_threads(args.threads)
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    windows = torch.randint(0, VOCAB, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=windows[:1, :2], use_cache=False)  # warm-up: kernels, thread pools
    base = rss_mib()
    began = time.perf_counter()
    if args.path == "full":
        with torch.inference_mode():
            total, count = nll_sum(causal_logits(model, windows), windows)
        nll = total / count
    else:
        nll = perplexity(model, windows, batch_size=args.batch, chunk=args.chunk or None)["nll"]
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"path": args.path, "batch": args.batch, "seqlen": args.seqlen, "chunk": args.chunk or "default",
                      "base_mib": round(base), "peak_mib": round(peak), "added_mib": round(peak - base),
                      "logits_mib": round(args.batch * args.seqlen * VOCAB * 4 / MIB), "nll": nll,
                      "seconds": round(seconds, 1)}))


def run(model: Path, path: str, batch: int, seqlen: int, chunk: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--path", path, "--batch", str(batch),
           "--seqlen", str(seqlen), "--chunk", str(chunk), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# (batch, seqlen): full and chunked (default budget) side by side; then the chunk sweep at 8 × 512.
PAIRS = [(1, 512), (4, 512), (8, 256), (8, 512)]
SWEEP = [32, 128, 511]
QUICK = [(1, 128), (4, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--path", choices=["full", "chunked"], default="chunked")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=0, help="positions per chunk; 0: from the budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jsonl", type=Path, default=Path(__file__).parent / "results" / "logits_memory.jsonl")
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama-262k"
        build(model)
        configs = [(p, b, s, 0) for b, s in (QUICK if args.quick else PAIRS) for p in ("full", "chunked")]
        configs += [] if args.quick else [("chunked", 8, 512, c) for c in SWEEP]
        for path, batch, seqlen, chunk in configs:
            rows.append(run(model, path, batch, seqlen, chunk, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| batch × seqlen | logits [b, L, V] fp32 MiB | path | chunk | peak RSS MiB | added MiB | s | nll |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} × {r['seqlen']} | {r['logits_mib']} | {r['path']} | {r['chunk']} | {r['peak_mib']} | "
              f"{r['added_mib']} | {r['seconds']} | {r['nll']:.6f} |")
    full = {(r["batch"], r["seqlen"]): r["added_mib"] for r in rows if r["path"] == "full"}
    for r in rows:
        if r["path"] == "chunked" and r["chunk"] == "default" and (r["batch"], r["seqlen"]) in full:
            ratio = full[(r["batch"], r["seqlen"])] / max(1, r["added_mib"])
            print(f"{r['batch']} × {r['seqlen']}: full adds {full[(r['batch'], r['seqlen'])]} MiB, chunked "
                  f"{r['added_mib']} MiB ({ratio:.1f}× less)")


if __name__ == "__main__":
    main()
