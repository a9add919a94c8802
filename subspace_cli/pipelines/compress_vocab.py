"""Low-rank factorisation of the vocabulary matrices, the input embedding and the LM head: off by
default, on when `--targets` names them (`--targets 'lm_head|embed_tokens|layers'`; `--exclude`
applies), for models whose vocabulary outweighs their blocks.

- The embedding E [V, d] ≈ up [V, r] · down [r, d] (LowRankEmbedding) by plain truncated SVD
  (Eckart & Young 1936): its input is one-hot, and a frequency-weighted fit would erase the rows
  of every token the calibration text never used.
- An untied LM head W [V, d] is a Linear and is factored as one, with the run's method; its input
  Gram is the final hidden states (calibration.record_head_inputs).
- Tied (`tie_word_embeddings`, one matrix in both roles) is factored once, by plain SVD since it
  serves both; the embedding becomes a LowRankEmbedding and the head a TiedLowRankLinear that
  reads the same two factors, so the tie holds in the checkpoint as in transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.linalg.gram import GramStats
from subspace_cli.modules.lowrank import LowRankEmbedding, LowRankLinear, TiedLowRankLinear, drop_stale_tied_keys
from subspace_cli.pipelines.factoring import factor_matrix
from subspace_cli.walk import embedding_scale, set_submodule, vocabulary_matrices


@dataclass
class VocabTargets:
    embedding: str | None = None  # the embedding to factor (the shared matrix when tied)
    head: str | None = None  # an untied LM head to factor
    tied_head: str | None = None  # a tied LM head: it reads the embedding's factors
    scale: float | None = None  # the embedding's constant row scale (Gemma)

    def matrices(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{name: weight [V, d]} of the matrices to plan ranks for (a tied matrix once)."""
        return {path: model.get_submodule(path).weight for path in (self.embedding, self.head) if path}


def _matches(pattern: str | None, path: str | None) -> bool:
    return bool(pattern and path and re.search(pattern, path))


def vocabulary_targets(model: nn.Module, config, dictionary_method: bool) -> VocabTargets:
    """Which vocabulary matrices this run factors; exit 2 for a selection that cannot be honoured."""
    vocab = vocabulary_matrices(model)
    chosen = {path for path in (vocab.embedding_path, vocab.head_path)
              if _matches(config.targets, path) and not _matches(config.exclude, path)}
    if not chosen:
        return VocabTargets()
    if dictionary_method:
        raise UsageError(f"--targets selects {', '.join(sorted(chosen))}, which sparse-dictionary methods do not "
                         "factor; use a low-rank method (svd-llm) or leave them out of --targets")
    if vocab.tied:
        excluded = [p for p in (vocab.embedding_path, vocab.head_path) if _matches(config.exclude, p)]
        if excluded:
            raise UsageError(f"{vocab.embedding_path} and {vocab.head_path} are one tied matrix "
                             f"(tie_word_embeddings); --targets selects one and --exclude '{config.exclude}' the "
                             "other: select both or neither")
        if vocab.head.bias is not None:
            raise UsageError(f"the tied LM head {vocab.head_path} has a bias, which a tied low-rank head does not "
                             "store; leave the embedding and the head out of --targets")
        return VocabTargets(embedding=vocab.embedding_path, tied_head=vocab.head_path,
                            scale=embedding_scale(vocab.embedding))
    targets = VocabTargets()
    if vocab.embedding_path in chosen:
        targets.embedding, targets.scale = vocab.embedding_path, embedding_scale(vocab.embedding)
    if vocab.head_path in chosen:
        targets.head = vocab.head_path
    return targets


def tied_note(targets: VocabTargets) -> str:
    return (f"{targets.embedding} and {targets.tied_head} share one tied matrix: factored once (plain SVD), the head "
            "reads the embedding's factors")


@torch.no_grad()
def factor_embedding(model: nn.Module, targets: VocabTargets, rank: int | None, state) -> None:
    """Replace the input embedding (and a head tied to it) by its rank-`rank` factors, plain SVD."""
    path = targets.embedding
    embedding = model.get_submodule(path)
    pair = factor_matrix(embedding.weight, None, rank, state, path, tall=True, plain=True)  # E [V, d]
    if pair is None:
        return
    up, down = pair  # [V, r], [r, d]
    vocab, dim = embedding.weight.shape
    new = LowRankEmbedding(vocab, dim, up.shape[1], scale=targets.scale, padding_idx=embedding.padding_idx,
                           dtype=up.dtype, device=up.device)
    new.up.weight.copy_(up)
    new.down.weight.copy_(down)
    set_submodule(model, path, new)
    if targets.tied_head:
        head = TiedLowRankLinear(dim, vocab)
        head.tie_to(new)
        set_submodule(model, targets.tied_head, head)
        drop_stale_tied_keys(model)


@torch.no_grad()
def factor_head(model: nn.Module, targets: VocabTargets, rank: int | None, stats: GramStats | None, state) -> None:
    """Replace an untied LM head W [V, d] by a LowRankLinear fitted with the final hidden states' Gram."""
    path = targets.head
    head = model.get_submodule(path)
    if stats is not None and stats.n_tokens == 0:
        state.notes.append(f"{path}: the model never called it as a module during calibration, so it has no input "
                           "Gram; factored by plain SVD")
        stats = None
    pair = factor_matrix(head.weight, stats, rank, state, path, tall=True, plain=stats is None)
    if pair is None:
        return
    bias = None if head.bias is None else head.bias.detach().clone()
    set_submodule(model, path, LowRankLinear.from_factors(*pair, bias).to(head.weight.device))
