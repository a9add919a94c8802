"""The vocabulary matrices (input embedding, LM head) through transformers' get_input_embeddings /
get_output_embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from subspace_cli.errors import UsageError


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, m in model.named_modules() if m is target), None)


@dataclass
class VocabularyMatrices:
    """The input embedding [V, d] and the LM head (a Linear [V, d]) of a model, and whether they are tied."""

    embedding_path: str | None
    embedding: nn.Module | None
    head_path: str | None
    head: nn.Module | None
    tied: bool


def vocabulary_matrices(model: nn.Module) -> VocabularyMatrices:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if not isinstance(embedding, nn.Embedding):
        embedding = None
    if not isinstance(head, nn.Linear):
        head = None
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    return VocabularyMatrices(_module_path(model, embedding), embedding, _module_path(model, head), head, tied)


def embedding_scale(embedding: nn.Module) -> float | None:
    """The constant an embedding multiplies its rows by (Gemma 3's `*ScaledWordEmbedding`), None for a
    plain nn.Embedding. Raises UsageError for any other Embedding subclass: its forward is unknown."""
    if type(embedding) is nn.Embedding:
        scale = None
    elif type(embedding).__name__.endswith("ScaledWordEmbedding") and hasattr(embedding, "scalar_embed_scale"):
        scale = float(embedding.scalar_embed_scale)
    else:
        raise UsageError(f"the input embedding is a {type(embedding).__name__}, whose forward subspace does not know; "
                         "only nn.Embedding and scaled word embeddings can be factored: drop it from --targets")
    if embedding.max_norm is not None:
        raise UsageError("the input embedding renormalises rows (max_norm), which a low-rank embedding cannot "
                         "reproduce: drop it from --targets")
    return scale
