"""Calibration token ids and held-out evaluation windows for a verb's config.

Calibration comes from the first 95% of each source, evaluation from the last 5%, so the two
never overlap. `self` (text sampled from the model) takes its even share of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspace_cli.io import data


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor  # [n, eval_seqlen]


def calibration_ids(config, model, tokenizer) -> torch.Tensor:
    """[calib_samples, calib_seqlen] token ids, sources mixed evenly in the order given."""
    from subspace_cli.evaluate.perplexity import check_seqlen

    check_seqlen(model, config.calib_seqlen, "--calib-seqlen")
    return mixed_rows(list(config.calib), model, tokenizer, config.calib_samples, config.calib_seqlen, config.seed,
                      config.device)


def mixed_rows(specs: list[str], model, tokenizer, n: int, seqlen: int, seed: int, device,
               flags: data.SampleFlags = data.CALIBRATION) -> torch.Tensor:
    """[n, seqlen] token ids sampled from the first 95% of each text source, and `self` rows sampled
    from `model`, each source its even share, in the order given."""
    n_self = round(n * specs.count(data.SELF_SPEC) / len(specs))
    texts = [s for s in specs if s != data.SELF_SPEC]
    parts = []
    if texts and n - n_self > 0:
        parts.append(data.resolve_calibration(texts, tokenizer, n - n_self, seqlen, seed, flags=flags).input_ids)
    if n_self:
        from subspace_cli.pipelines.self_calibration import generate_calibration

        parts.append(generate_calibration(model, tokenizer, n_self, seqlen, seed, device=device))
    return torch.cat(parts)


def evaluation_sets(config, model, tokenizer, notes: list[str], default_flag: str = "--calib") -> list[EvalSet]:
    """Held-out windows of each --eval source, else of the text sources `config.calib` (named by
    `default_flag` in messages)."""
    from subspace_cli.evaluate.perplexity import check_seqlen, is_causal_lm

    if not is_causal_lm(model):
        notes.append(f"perplexity skipped: {type(model).__name__} is not a causal language model")
        return []
    specs = config.eval if config.eval is not None else [s for s in config.calib if s != data.SELF_SPEC]
    if not specs:
        notes.append("perplexity skipped: no evaluation data (pass --eval)")
    check_seqlen(model, config.eval_seqlen, "--eval-seqlen")
    flag = "--eval" if config.eval is not None else default_flag
    return [
        EvalSet(spec, data.eval_windows(tokenizer, data.load_heldout(spec, flag=flag), config.eval_seqlen,
                                        config.eval_chars, what=f"the held-out 5% of {flag} '{spec}'"))
        for spec in specs
    ]
