"""How the unlearn defaults were chosen: train each configuration and score held-out perplexity.

The same data as benchmarks/unlearn_quality.py (forget: builtin:kjv, retain: builtin:shakespeare,
64 rows of 128 tokens each), but no membership test and no checkpoint write, and 10,000 held-out
characters per set (dense model: forget 33.20, retain 31.89), so one configuration takes 1-3 min
on 2 CPU cores. Each argument is a JSON object: "method" plus any -O options.

    python benchmarks/unlearn_sweep.py '{"method": "rmu", "lr": 1e-3, "retain_weight": 1000}' \
                                       '{"method": "sspu", "relevant": 128}'
"""

from __future__ import annotations

import json
import sys
import time

import torch


def score(method: str, options: dict) -> dict:
    from subspace_cli.evaluate.perplexity import perplexity
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.methods.catalog import get_method
    from subspace_cli.pipelines import unlearn
    from subspace_cli.pipelines.unlearn_config import UnlearnConfig

    start = time.perf_counter()
    config = UnlearnConfig(model="builtin:smollm2-135m", out="unused", method=method, options=options,
                           forget="builtin:kjv", retain="builtin:shakespeare", eval_chars=10000)
    loaded = load_model_and_tokenizer(config.model, dtype="float32")
    model = loaded.model
    sets = unlearn._Sets(config, loaded.tokenizer)
    registered = get_method("unlearn", method)
    method_config = registered.make_config(options)
    plan = registered.plan(model, sets.train, method_config, torch.Generator().manual_seed(config.seed))
    model.train(False)
    curve = unlearn.train_plan(plan, method_config, sets.train, config.seed)
    plan.finish()
    for param in model.parameters():
        param.requires_grad_(False)
    return {"method": method, **options,
            "forget": perplexity(model, sets.forget_eval, batch_size=8)["ppl"],
            "retain": perplexity(model, sets.retain_eval, batch_size=8)["ppl"],
            "last_step": curve[-1], "seconds": time.perf_counter() - start}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    for argument in sys.argv[1:]:
        options = json.loads(argument)
        print(json.dumps(score(options.pop("method"), options)), flush=True)


if __name__ == "__main__":
    main()
