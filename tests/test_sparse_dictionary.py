"""Sparse dictionary learning (batched OMP, K-SVD), its storage accounting and DictionaryLinear."""

import math

import pytest
import torch

from subspace_cli.linalg.dictionary_budget import dictionary_size, position_bytes
from subspace_cli.linalg.sparse_dictionary import _omp_chunk, batched_omp, fit_dictionary, ksvd_update_
from subspace_cli.modules.lowrank import dictionary_from_factors, pack_bitmask
from subspace_cli.modules.remote_modeling import DictionaryLinear, _unpack_bitmask


def _unit_columns(m, k, seed, dtype=torch.float64):
    d = torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return d / d.norm(dim=0)


def _planted(m=64, k=96, n=200, s=4, seed=0):
    """Y = D·S with s-sparse columns whose values are bounded away from zero."""
    g = torch.Generator().manual_seed(seed)
    dictionary = _unit_columns(m, k, seed)
    support = torch.rand(n, k, generator=g).argsort(1)[:, :s]
    values = (1 + torch.rand(n, s, generator=g, dtype=torch.float64)) * torch.randn(n, s, generator=g, dtype=torch.float64).sign()
    codes = torch.zeros(n, k, dtype=torch.float64).scatter_(1, support, values).T
    return dictionary, codes, dictionary @ codes


def _naive_omp(dictionary, y, s):
    """Textbook OMP for one column: least squares on the chosen atoms after every pick."""
    chosen, residual = [], y.clone()
    for _ in range(s):
        corr = dictionary.T @ residual
        corr[chosen] = 0
        chosen.append(int(corr.abs().argmax()))
        coeffs = torch.linalg.lstsq(dictionary[:, chosen], y[:, None]).solution[:, 0]
        residual = y - dictionary[:, chosen] @ coeffs
    out = torch.zeros(dictionary.shape[1], dtype=y.dtype)
    out[chosen] = coeffs
    return out


def test_omp_recovers_a_planted_sparse_code_exactly():
    dictionary, codes, target = _planted()
    found = batched_omp(dictionary, target, 4).dense(96)
    assert torch.equal(found != 0, codes != 0)  # the exact supports
    assert torch.allclose(found, codes, atol=1e-9)


def test_batched_omp_matches_textbook_omp_column_by_column():
    dictionary = _unit_columns(24, 40, seed=1)
    target = torch.randn(24, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batched = batched_omp(dictionary, target, 9).dense(40)
    naive = torch.stack([_naive_omp(dictionary, target[:, j], 9) for j in range(30)], dim=1)
    assert torch.allclose(batched, naive, atol=1e-9)


def test_orthonormal_shortcut_equals_general_omp():
    q = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0][:, :20]
    target = torch.randn(32, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fast = batched_omp(q, target, 6).dense(20)  # takes the thresholding path
    general = _omp_chunk(q.T @ q, (q.T @ target).T.contiguous(), 6, structured=False).dense(20)
    assert torch.allclose(fast, general, atol=1e-10)


@pytest.mark.parametrize("orthonormal", [True, False])
def test_two_four_structure_holds_in_every_group(orthonormal):
    m, k = 32, 24
    dictionary = torch.eye(m, k, dtype=torch.float64) if orthonormal else _unit_columns(m, k, seed=5)
    target = torch.randn(m, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    code = batched_omp(dictionary, target, 12, structure="2:4")
    per_group = (code.dense(k) != 0).reshape(k // 4, 4, -1).sum(1)
    assert int(per_group.max()) <= 2 and code.indices.shape == (40, 12)
    with pytest.raises(ValueError, match="2:4"):
        batched_omp(dictionary, target, 13, structure="2:4")


def test_omp_rejects_nonzeros_out_of_range():
    with pytest.raises(ValueError, match="nonzeros"):
        batched_omp(torch.eye(4, 3), torch.randn(4, 2), 4)


@pytest.mark.parametrize("recode_every", [0, 1])
def test_ksvd_error_never_increases(recode_every):
    target = torch.randn(40, 120, generator=torch.Generator().manual_seed(7))
    initial = torch.randn(40, 30, generator=torch.Generator().manual_seed(8))
    fit = fit_dictionary(target, initial, 8, iterations=12, recode_every=recode_every, tolerance=0.0)
    assert len(fit.errors) == 13
    steps = torch.tensor(fit.errors).diff()
    assert bool((steps <= 1e-6).all()), fit.errors  # fp32: monotone up to rounding
    assert fit.errors[-1] < 0.95 * fit.errors[0]  # and it actually learns
    assert torch.allclose(fit.dictionary.norm(dim=0), torch.ones(30), atol=1e-5)


def test_ksvd_residual_stays_consistent():
    """The residual is updated by rank-1 terms; it must still equal Y − D·S after a sweep."""
    target = torch.randn(20, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    dictionary = _unit_columns(20, 16, seed=10)
    code = batched_omp(dictionary, target, 5)
    residual = ksvd_update_(target, dictionary, code)
    assert torch.allclose(residual, target - dictionary @ code.dense(16), atol=1e-10)


def test_stalled_error_stops_early():
    target = torch.randn(16, 40, generator=torch.Generator().manual_seed(11))
    fit = fit_dictionary(target, torch.eye(16, 12), 6, iterations=200, tolerance=0.05)
    assert len(fit.errors) < 201


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("shape", [(576, 576), (576, 1536), (1536, 576), (576, 192), (33, 17)])
@pytest.mark.parametrize("k_over_s", [2.0, 3.5])
def test_dictionary_size_is_the_largest_that_fits(shape, k_over_s):
    in_f, out_f = shape
    budget = 0.8 * in_f * out_f
    size = dictionary_size(in_f, out_f, budget, k_over_s=k_over_s, max_atoms=min(shape))
    assert size is not None and size.nonzeros == int(size.atoms / k_over_s + 1e-9) >= 1
    assert size.params(in_f, out_f) <= budget
    bigger = size.atoms + 1
    s = int(bigger / k_over_s + 1e-9)
    cost = bigger * in_f + s * out_f + position_bytes(out_f, bigger, s)[1] / 2
    assert bigger > min(shape) or cost > budget


def test_positions_take_the_smaller_encoding():
    assert position_bytes(100, 64, 32) == ("bitmask", 100 * 8)  # 8 B of bits vs 64 B of int16 per row
    assert position_bytes(100, 4096, 3) == ("indices", 100 * 3 * 2)
    assert position_bytes(10, 40000, 2) == ("indices", 10 * 2 * 4)  # int32 past 32,767 atoms


def test_unreachable_budget_and_structure():
    assert dictionary_size(8, 8, 10.0, k_over_s=2.0, max_atoms=8) is None  # even s = 1 costs more
    shared = dictionary_size(64, 64, 3 * 0.5 * 64 * 64, k_over_s=2.0, max_atoms=64, members=3)
    single = dictionary_size(64, 64, 0.5 * 64 * 64, k_over_s=2.0, max_atoms=64)
    assert shared.atoms > single.atoms  # a shared dictionary is paid once
    structured = dictionary_size(576, 576, 0.8 * 576 * 576, k_over_s=2.0, max_atoms=576, structure="2:4")
    assert structured.atoms % 4 == 0


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("positions", ["indices", "bitmask"])
def test_dictionary_linear_matches_its_dense_weight(positions):
    g = torch.Generator().manual_seed(12)
    k, in_f, out_f, s = 21, 10, 7, 5
    dictionary = torch.randn(k, in_f, generator=g)
    ids = torch.rand(out_f, k, generator=g).argsort(1)[:, :s]  # unsorted on purpose
    values = torch.randn(out_f, s, generator=g)
    bias = torch.randn(out_f, generator=g)
    module = dictionary_from_factors(dictionary, values, ids, bias, positions=positions)
    weight = torch.zeros(out_f, k).scatter_(1, ids, values) @ dictionary
    x = torch.randn(3, 4, in_f, generator=g)
    assert torch.allclose(module(x), x @ weight.T + bias, atol=1e-5)
    assert torch.allclose(module.dense_weight(), weight, atol=1e-6)


def test_bitmask_round_trip_and_wide_indices():
    ids = torch.rand(9, 70).argsort(1)[:, :13].sort(1).values
    mask = pack_bitmask(ids, 70)
    assert mask.shape == (9, math.ceil(70 / 8)) and mask.dtype == torch.uint8
    assert torch.equal(_unpack_bitmask(mask, 70, 13), ids)
    wide = DictionaryLinear(1, 2, 40000, 1)
    assert wide.indices.dtype == torch.int32


def test_shared_dictionary_is_read_from_its_owner():
    owner = dictionary_from_factors(torch.randn(6, 4), torch.randn(3, 2), torch.tensor([[0, 1], [2, 3], [4, 5]]))
    follower = dictionary_from_factors(torch.randn(6, 4), torch.randn(3, 2), torch.tensor([[1, 2], [0, 5], [3, 4]]))
    follower.share_dictionary(owner)
    assert "dictionary" not in dict(follower.named_parameters())
    assert follower.dictionary_weight is owner.dictionary
    with pytest.raises(ValueError, match="shared dictionary"):
        DictionaryLinear(4, 3, 7, 2).share_dictionary(owner)
