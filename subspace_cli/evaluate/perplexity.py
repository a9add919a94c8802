"""Perplexity of a causal LM over fixed windows of token ids.

Each window [L] is scored on its own: position t predicts token t+1, so a window gives L − 1
scored tokens; the result is the token-weighted mean NLL over all windows and exp of it.
Logits are made a chunk of positions at a time (evaluate/chunked_logits.py: [b, c, V] with c
chosen so a float32 chunk fits a 64 MiB budget, not the batch's [b, L, V]), in the model's dtype;
log-probabilities in float32, sums in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from subspace_cli.evaluate.chunked_logits import BatchLogits

Progress = Callable[[int], None]  # called with the number of windows just processed


def is_causal_lm(model) -> bool:
    """True for next-token LMs (GPT-2, Llama, ...); False for encoders such as BertModel."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return True
    except ImportError:  # pragma: no cover - layout of transformers changed
        pass
    has_head = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    return has_head and name.endswith(("ForCausalLM", "LMHeadModel"))


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_seqlen(model, seqlen: int, flag: str = "--eval-seqlen") -> None:
    """UsageError when `seqlen` exceeds the model's position embeddings (when it declares them).

    `model` is a model, or its config as an object or as config.json's dict (merge reads no model)."""
    from subspace_cli.errors import UsageError

    config = getattr(model, "config", model)
    read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    limit = read("max_position_embeddings") or read("n_positions")
    if isinstance(limit, int) and seqlen > limit:
        raise UsageError(f"{flag} {seqlen} exceeds the model's {limit} positions; use at most {limit}")


def iter_batches(windows: torch.Tensor, batch_size: int, device) -> Iterator[torch.Tensor]:
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, L], got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size].to(device=device, dtype=torch.long)


def causal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, L] -> [b, L, V] in the model's dtype: the whole batch's logits. With `nll_sum`, the
    computation before chunking, kept as the reference benchmarks/logits_memory.py measures against;
    scorers use `scored_chunks`."""
    return model(input_ids=ids, use_cache=False).logits


def scored_chunks(model, ids: torch.Tensor, chunk: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [b, c, V], targets [b, c]) over consecutive chunks of the L − 1 scored positions of ids
    [b, L]: logits at positions t, targets ids[:, t+1]. One decoder pass; `chunk` positions at a time
    (default: a float32 chunk within the logits budget)."""
    batch = BatchLogits(model, ids, chunk=chunk)
    for positions in batch.chunks(ids.shape[1] - 1):
        yield batch.logits(positions), ids[:, positions.start + 1 : positions.stop + 1]


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ −log p(targets) of logits [b, c, V] and targets [b, c], in float64."""
    # Flattened to [b·c, V]: log-softmax over a transposed [b, V, c] is far slower on CPU.
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [b·c] float32
    return float(losses.double().sum())


def batch_nll(model, ids: torch.Tensor, chunk: int | None = None) -> tuple[float, int]:
    """Σ −log p(ids[:, t+1] | ids[:, ≤t]) over a batch [b, L], float64, and the number of tokens,
    chunk by chunk."""
    total = sum(chunk_nll(logits, targets) for logits, targets in scored_chunks(model, ids, chunk))
    return float(total), ids.shape[0] * (ids.shape[1] - 1)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Σ −log p(ids[:, t+1] | ids[:, ≤t]) over a batch, float64, and the number of tokens, from the
    whole logits [b, L, V] (see `causal_logits`; `batch_nll` is the chunked equivalent)."""
    total = 0.0
    for row_logits, row_ids in zip(logits, ids):  # one window at a time bounds fp32 memory
        losses = F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="none")  # [L-1]
        total += float(losses.double().sum())
    return total, ids.shape[0] * (ids.shape[1] - 1)


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


@torch.inference_mode()
def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 8, device=None, progress: Progress | None = None,
    chunk: int | None = None, processes=None,
) -> dict:
    """{"ppl", "nll", "n_tokens"}: exp of the mean next-token NLL over all windows [n, L]; `chunk`
    positions' logits at a time (default: from the logits budget). The one perplexity of every verb.

    `processes` (pipelines/distributed.py Processes, or anything with `share(rows)` and `sum_(t)`):
    each process scores its share of the windows and the NLL sum and token count are summed over
    the processes, so the result is the single-process perplexity (to float reassociation).
    """
    device = device or model_device(model)
    shared = processes is not None and processes.distributed
    total, count = 0.0, 0
    for ids in iter_batches(processes.share(windows) if shared else windows, batch_size, device):
        s, n = batch_nll(model, ids, chunk)
        total, count = total + s, count + n
        if progress:
            progress(ids.shape[0])
    if shared:
        sums = processes.sum_(torch.tensor([total, float(count)], dtype=torch.float64))  # [Σ nll, Σ tokens]
        total, count = float(sums[0]), int(sums[1])
    if count == 0:
        raise ValueError("no tokens to score: windows must be at least 2 tokens long")
    nll = total / count
    return {"ppl": safe_exp(nll), "nll": nll, "n_tokens": count}
