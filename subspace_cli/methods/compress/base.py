"""The compress contract.

A `LowRankMethod` gives the transform M of W·M whose truncated SVD is the factorisation
(W [out, in] ≈ SVD_r(W·M)·M⁻¹); the pipeline owns rank allocation, truncation and the written
LowRankLinear. A `DictionaryMethod` also fits a sparse dictionary in that space:
fit(spectral of W·M, size, config, generator) -> DictionaryFactors (W ≈ S·D, S with s nonzeros
per row), which the pipeline packs into a DictionaryLinear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from subspace_cli.linalg.dictionary_budget import DictionarySize
from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.sparse_dictionary import DictionaryFit
from subspace_cli.linalg.truncation import Spectral, Transform
from subspace_cli.methods.registry import Method, MethodConfig


@dataclass
class DictionaryFactors:
    dictionary: torch.Tensor  # [k, in] float64, de-whitened
    indices: torch.Tensor  # [rows, s] int64 atom ids, rows = out summed over the group
    values: torch.Tensor  # [rows, s] float64
    fit: DictionaryFit


@dataclass(frozen=True, kw_only=True)
class LowRankMethod(Method):
    verb: ClassVar[str] = "compress"
    # transform(weight [out, in], calibration statistics or None, config) -> M
    transform: Callable[[torch.Tensor, GramStats | None, Any], Transform]


@dataclass(frozen=True, kw_only=True)
class DictionaryMethod(LowRankMethod):
    # fit(spectral of W·M, dictionary size, config, generator) -> factors
    fit: Callable[[Spectral, DictionarySize, Any, torch.Generator], DictionaryFactors]


def is_dictionary(method: Method) -> bool:
    return isinstance(method, DictionaryMethod)


__all__ = ["DictionaryFactors", "DictionaryMethod", "LowRankMethod", "MethodConfig", "is_dictionary"]
