"""Drift of an edited model from its baseline on the same windows.

- causal LMs: mean per-token KL(baseline ‖ model) of the next-token distributions, at the
  L − 1 positions that perplexity scores;
- encoders without an LM head (BertModel): mean cosine similarity of the last hidden states,
  per token (all L positions).

`score_windows` does perplexity, baseline perplexity and KL in one pass over the windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subspace_cli.errors import UsageError
from subspace_cli.evaluate.chunked_logits import positions_per_chunk, vocab_size
from subspace_cli.evaluate.perplexity import (Progress, chunk_nll, is_causal_lm, iter_batches, model_device, safe_exp,
                                              scored_chunks)


def kl_sum(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Σ over positions of KL(p_base ‖ p), float64; inputs [b, c, V] at the same (scored) positions."""
    if base_logits.shape[-1] != logits.shape[-1]:
        raise UsageError(
            f"model and baseline have different vocabulary sizes ({logits.shape[-1]} vs "
            f"{base_logits.shape[-1]}); compare models that share a tokenizer"
        )
    lp_base = F.log_softmax(base_logits.float(), dim=-1)  # [b, c, V]
    lp = F.log_softmax(logits.float(), dim=-1)
    return float((lp_base.exp() * (lp_base - lp)).sum(-1).double().sum())


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, L] -> last hidden state [b, L, d] (encoders with or without a task head)."""
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise UsageError(f"{type(model).__name__} returns no hidden states to compare")
        hidden = states[-1]
    return hidden


@torch.inference_mode()
def mean_token_kl(
    model, baseline, windows: torch.Tensor, *, batch_size: int = 4, device=None, progress: Progress | None = None,
    chunk: int | None = None,
) -> float:
    """Mean over scored tokens of KL(baseline ‖ model) (0 for identical models)."""
    return score_windows(model, windows, baseline=baseline, batch_size=batch_size, device=device, progress=progress,
                         chunk=chunk)["kl"]


@torch.inference_mode()
def embedding_similarity(
    model, baseline, windows: torch.Tensor, *, batch_size: int = 8, device=None, progress: Progress | None = None
) -> float:
    """Mean over tokens of cos(h_model, h_baseline) of the last hidden states (1 when identical)."""
    device = device or model_device(model)
    total, count = 0.0, 0
    for ids in iter_batches(windows, batch_size, device):
        h = hidden_states(model, ids).float()  # [b, L, d]
        h_base = hidden_states(baseline, ids.to(model_device(baseline))).float().to(h.device)
        if h.shape != h_base.shape:
            raise UsageError(f"model and baseline hidden states differ in shape ({tuple(h.shape)} vs {tuple(h_base.shape)})")
        total += float(F.cosine_similarity(h, h_base, dim=-1).double().sum())
        count += ids.numel()
        if progress:
            progress(ids.shape[0])
    return total / max(count, 1)


@torch.inference_mode()
def score_windows(
    model, windows: torch.Tensor, *, baseline=None, batch_size: int = 8, device=None, progress: Progress | None = None,
    chunk: int | None = None,
) -> dict:
    """One pass over the windows, `chunk` positions' logits at a time (default: from the logits
    budget, counting both models); a JSON-ready dict.

    Causal LM: metric "perplexity", ppl, nll, n_tokens and, with a baseline, baseline_ppl,
    baseline_nll, ppl_ratio (ppl / baseline_ppl) and kl. Encoder (no LM head): needs a
    baseline; metric "embedding_similarity", embedding_similarity, n_tokens.
    """
    if not is_causal_lm(model):
        if baseline is None:
            raise UsageError(
                f"{type(model).__name__} has no language-model head, so perplexity is undefined; "
                "pass --baseline to measure embedding similarity against it instead"
            )
        sim = embedding_similarity(model, baseline, windows, batch_size=batch_size, device=device, progress=progress)
        return {"metric": "embedding_similarity", "embedding_similarity": sim, "n_tokens": int(windows.numel())}
    if baseline is not None and not is_causal_lm(baseline):
        raise UsageError(f"baseline {type(baseline).__name__} is not a causal LM like the model; compare like with like")

    device = device or model_device(model)
    nll, base_nll, kl, count = 0.0, 0.0, 0.0, 0
    for ids in iter_batches(windows, batch_size, device):
        # Both models' logits are alive at once for KL: each gets half the budget.
        size = chunk or positions_per_chunk(ids.shape[0] * (1 if baseline is None else 2), vocab_size(model))
        chunks = scored_chunks(model, ids, size)
        if baseline is None:
            nll += sum(chunk_nll(logits, targets) for logits, targets in chunks)
        else:
            base_chunks = scored_chunks(baseline, ids.to(model_device(baseline)), size)
            for (logits, targets), (base_logits, _) in zip(chunks, base_chunks):  # the same positions
                base_logits = base_logits.to(logits.device)
                nll += chunk_nll(logits, targets)
                kl += kl_sum(base_logits, logits)
                base_nll += chunk_nll(base_logits, targets)
                del base_logits, logits
        count += ids.shape[0] * (ids.shape[1] - 1)
        if progress:
            progress(ids.shape[0])
    if count == 0:
        raise UsageError("no tokens to score: each window needs at least 2 tokens (pass a longer text, "
                         "or an --eval-seqlen of at least 2)")
    result = {"metric": "perplexity", "ppl": safe_exp(nll / count), "nll": nll / count, "n_tokens": count}
    if baseline is not None:
        result["baseline_ppl"] = safe_exp(base_nll / count)
        result["baseline_nll"] = base_nll / count
        # exp(nll − nll_base) rather than a ratio of two exps: exact 1.0 for identical models.
        result["ppl_ratio"] = safe_exp(result["nll"] - result["baseline_nll"])
        result["kl"] = kl / count
    return result
