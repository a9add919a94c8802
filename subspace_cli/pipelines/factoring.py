"""Factor one matrix with the run's low-rank method and record its report row.

Shared by every kind of matrix compress factors: the Linears of the blocks, each expert's slice
of a 3-D expert parameter, the input embedding and the LM head. Tall vocabulary matrices
([V, d], V ≫ d) go through linalg/tall_svd.py so nothing of size V is formed in float64.
"""

from __future__ import annotations

import torch

from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.rank_allocation import MatrixSpec, factored_params
from subspace_cli.linalg.tall_svd import tall_decompose, tall_factors, tall_relative_error
from subspace_cli.linalg.truncation import Spectral, Transform, decompose, energy_kept, factors, weighted_relative_error
from subspace_cli.methods.registry import Needs
from subspace_cli.report.schema import MatrixReport


def transform_for(weight: torch.Tensor, stats: GramStats | None, state, plain: bool = False) -> Transform:
    """The method's M for W·M; `plain` (or no statistics for a method that needs them) is the identity."""
    if plain or (stats is None and Needs.CALIBRATION in state.method.needs):
        return Transform("identity")
    return state.method.transform(weight, stats, state.method_config)


def spectrum(weight: torch.Tensor, stats: GramStats | None, state, *, tall: bool = False,
             plain: bool = False) -> Spectral:
    transform = transform_for(weight, stats, state, plain)
    return tall_decompose(weight, transform) if tall else decompose(weight, transform)


def factor_matrix(weight: torch.Tensor, stats: GramStats | None, rank: int | None, state, name: str, *,
                  tall: bool = False, plain: bool = False, **row) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up [out, r], down [r, in]) in the weight's dtype, or None to keep it dense (`rank` None).

    Appends the matrix's row to `state.matrices`; `row` adds report fields (tokens, gram).
    """
    weight = weight.detach()  # [out, in]
    out_f, in_f = weight.shape
    spec = MatrixSpec(name, in_f, out_f)
    gram = stats.covariance if stats is not None and not plain else None
    if rank is None:
        state.matrices.append(MatrixReport(
            name=name, shape=(out_f, in_f), rank=None, params_before=spec.dense_params,
            params_after=spec.dense_params, whitened_rel_error=0.0, energy_kept=1.0, **row))
        return None
    spectral = spectrum(weight, stats, state, tall=tall, plain=plain)
    if tall:
        up, down = tall_factors(spectral, rank)  # [out, r] weight dtype, [r, in] float64
        error = tall_relative_error(weight, up, down, gram)
    else:
        up, down = factors(spectral, rank)  # [out, r], [r, in] float64
        error = weighted_relative_error(weight, up @ down, gram)
    state.matrices.append(MatrixReport(
        name=name, shape=(out_f, in_f), rank=rank, params_before=spec.dense_params,
        params_after=factored_params(spec, rank), whitened_rel_error=error,
        energy_kept=energy_kept(spectral, rank), **row))
    return up.to(weight.dtype), down.to(weight.dtype)
