"""How much of a batch-1 decode step is weight traffic, and so what speed-up a smaller model can reach.

The memory-bound ceiling of `subspace bench` (baseline weight bytes / model weight bytes) assumes
that every millisecond of a decode step reads weights. The rest of the step (attention over the KV
cache, norms, rotary embeddings, the cache update, Python dispatch) does not shrink with the
weights. This script measures that rest: it times greedy decoding with the KV cache as `subspace
bench` does, then again with every Linear product (nn.Linear, and the factored modules' own
products) replaced by a stub that returns zeros of the right shape, and reports

    attainable speed-up = T_dense / (T_rest(model) + T_linear(dense) · bytes(model) / bytes(dense))

beside the measured one: what the model would reach if its products ran at the dense model's
bandwidth. Rounds interleave the models; each figure is the best round.

    OMP_NUM_THREADS=2 python benchmarks/decode_overhead.py builtin:smollm2-135m DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from subspace_cli.modules import remote_modeling
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.pipelines.bench import _decode, weight_bytes


def _decode_ms(model, ids: torch.Tensor, steps: int) -> float:
    with torch.inference_mode():
        prefilled = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        _decode(model, prefilled, steps, "past_key_values")
        return (time.perf_counter() - start) / steps * 1e3


def _zeros(module, x):
    return x.new_zeros(*x.shape[:-1], module.out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="the first is the baseline (dense)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    models = {ref: load_model_and_tokenizer(ref, with_tokenizer=False).model for ref in args.models}
    ids = torch.randint(0, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up (and a dictionary layer's choice of form)
        _decode_ms(model, ids[:, :8], 1)
    dictionary = remote_modeling.DictionaryLinear
    real = (nn.Linear.forward, remote_modeling._linear, dictionary.forward)
    stubs = (lambda self, x: _zeros(self, x), _zeros, lambda self, x: _zeros(self, x))
    times: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for stubbed in (False, True):
            nn.Linear.forward, remote_modeling._linear, dictionary.forward = stubs if stubbed else real
            try:
                for ref, model in models.items():
                    key = (ref, "rest" if stubbed else "total")
                    times[key] = min(times.get(key, float("inf")), _decode_ms(model, ids, args.decode_tokens))
            finally:
                nn.Linear.forward, remote_modeling._linear, dictionary.forward = real
    base = args.models[0]
    linear_base = times[base, "total"] - times[base, "rest"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {args.prompt_len}, "
          f"{args.decode_tokens} decode tokens, best of {args.rounds}")
    print("| model | decode ms/token | non-weight ms | products ms | measured × | ceiling × | attainable × |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ref, model in models.items():
        total, rest = times[ref, "total"], times[ref, "rest"]
        share = weight_bytes(model) / weight_bytes(models[base])
        attainable = times[base, "total"] / (rest + linear_base * share)
        print(f"| {ref} | {total:.2f} | {rest:.2f} | {total - rest:.2f} | {times[base, 'total'] / total:.2f} | "
              f"{1 / share:.2f} | {attainable:.2f} |")


if __name__ == "__main__":
    main()
