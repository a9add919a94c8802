"""`cospadi`: calibration-guided sparse dictionary compression. W [out, in] ≈ S·D with a dense
dictionary D [k, in] and S [out, k] holding exactly s nonzeros per row: each output mixes its
own few atoms, a union of subspaces instead of the one subspace of a low-rank factor.

The fit runs in svd-llm's whitened space (W·L, G = L·Lᵀ the calibration Gram), where the
Frobenius error is the output error over the calibration activations. The rows of W·L = U Σ Vᵀ
live in span(V), so everything is done in V's coordinates: the targets are the columns of
Σ·Uᵀ [m, out] (m = rank), the SVD initialisation is the first k coordinate axes, and the
learned atoms map back as D = D̂ᵀ·Vᵀ·L⁻¹. Dictionary and codes come from
`linalg.sparse_dictionary` (batched OMP + K-SVD).

Reference: Makhov, Shopkhoev et al., "CoSpaDi: Compressing LLMs via Calibration-Guided Sparse
Dictionary Learning", arXiv 2509.22075. The exact sparsity and atom-sharing grouping follow the paper;
re-coding only every `recode_every` updates (default: never after the SVD-initialised coding)
is ours, measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from subspace_cli.linalg.dictionary_budget import DictionarySize
from subspace_cli.linalg.sparse_dictionary import fit_dictionary
from subspace_cli.linalg.truncation import Spectral
from subspace_cli.methods.compress.base import DictionaryFactors, DictionaryMethod
from subspace_cli.methods.compress.svd_llm import SVDLLMConfig, svd_llm_transform
from subspace_cli.methods.registry import Needs, register


class CoSpaDiConfig(SVDLLMConfig):
    k_over_s: float = Field(2.0, gt=1.0, le=64.0, description="atoms per nonzero: k/s (the paper's default is 2)")
    iterations: int = Field(8, ge=0, le=1000, description="K-SVD dictionary updates (at most; see tolerance)")
    recode_every: int = Field(
        0, ge=0, description="re-run OMP after every N updates (the paper: 1); 0 codes once, on the SVD initialisation")
    tolerance: float = Field(1e-3, ge=0.0, description="stop once an update lowers the relative error by less than this fraction")
    init: Literal["svd", "columns"] = Field("svd", description="initial dictionary: top-k whitened singular directions, or k sampled rows of W·L")
    structure: Literal["none", "2:4"] = Field(
        "none", description="2:4: at most 2 nonzeros in every 4 consecutive atoms of a row (semi-structured sparsity)")
    group_size: int = Field(
        1, ge=1, description="blocks sharing one dictionary per projection type (the Gram is averaged over the group)")




def initial_dictionary(target: torch.Tensor, atoms: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """[m, k]: the first k coordinate axes (target in singular coordinates), or k sampled columns."""
    m, n = target.shape
    if init == "svd":
        return torch.eye(m, atoms, dtype=target.dtype)
    if atoms > n:
        raise ValueError(f"init 'columns' needs atoms <= {n} columns, got {atoms}")
    chosen = torch.randperm(n, generator=generator)[:atoms]
    return target[:, chosen]


def fit_cospadi(spectral: Spectral, size: DictionarySize, config: CoSpaDiConfig,
                generator: torch.Generator) -> DictionaryFactors:
    """Fit the stacked whitened rows of one matrix (or a group) at `size`."""
    target = (spectral.s[:, None] * spectral.u.T).to(torch.float32)  # Σ·Uᵀ [m, rows]
    fit = fit_dictionary(
        target, initial_dictionary(target, size.atoms, config.init, generator), size.nonzeros,
        iterations=config.iterations, recode_every=config.recode_every, tolerance=config.tolerance,
        structure=None if config.structure == "none" else config.structure)
    atoms_whitened = fit.dictionary.to(torch.float64).T @ spectral.vh  # [k, in] in the whitened space
    dictionary = spectral.transform.apply_inverse(atoms_whitened)
    return DictionaryFactors(dictionary, fit.code.indices, fit.code.coeffs.to(torch.float64), fit)


register(DictionaryMethod(
    name="cospadi", config_class=CoSpaDiConfig, transform=svd_llm_transform, fit=fit_cospadi,
    paper="Makhov, Shopkhoev et al. 2025, arXiv 2509.22075",
    summary="whitened sparse dictionary (K-SVD + batched OMP), packed codes",
    needs={Needs.CALIBRATION},
))
