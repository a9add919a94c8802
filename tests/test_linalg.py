"""Invariants of the low-rank linear algebra (tolerances stated with each assertion)."""

import pytest
import torch

from subspace_cli.errors import UsageError
from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.rank_allocation import MatrixSpec, allocate, factored_params
from subspace_cli.linalg.truncation import Transform, decompose, energy_kept, factors, weighted_relative_error
from subspace_cli.linalg.whitening import cholesky_whitener, shrink_gram


def _activations(n=4096, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix).to(torch.float32)


def test_gram_matches_float64_reference():
    x = _activations(5000, 32)
    stats = GramStats(32)
    stats.update(x[:1234])
    stats.update(x[1234:].reshape(2, -1, 32))  # leading shape does not matter
    ref = x.double().T @ x.double()
    # float32 chunk products summed in float64: relative error of one 2048-token chunk
    assert torch.allclose(stats.gram, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    assert stats.n_tokens == 5000
    assert torch.allclose(stats.abs_mean, x.double().abs().mean(0), rtol=1e-6)


def test_cholesky_whitener_reconstructs_and_shifts_singular():
    x = _activations().double()
    gram = x.T @ x
    L = cholesky_whitener(gram)
    assert torch.allclose(L @ L.T, gram, rtol=1e-10, atol=1e-8)
    singular = gram.clone()
    singular[:, 0] = 0
    singular[0, :] = 0  # a dead input channel
    L = cholesky_whitener(singular)
    assert torch.isfinite(L).all()
    # the shift is tiny relative to the Gram's scale
    assert (L @ L.T - singular).abs().max() < 1e-5 * singular.diagonal().mean()


def test_shrinkage_interpolates_toward_diagonal():
    gram = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    assert torch.equal(shrink_gram(gram, 0.0), gram)
    half = shrink_gram(gram, 0.5)
    assert half[0, 1] == 0.5 and half[0, 0] == 2.0


@pytest.mark.parametrize("kind", ["identity", "diagonal", "lower"])
def test_truncation_loss_equals_discarded_energy(kind):
    torch.manual_seed(0)
    w = torch.randn(16, 24, dtype=torch.float64)
    x = _activations().double()
    gram = x.T @ x
    transform = {
        "identity": Transform("identity"),
        "diagonal": Transform("diagonal", x.abs().mean(0).sqrt()),
        "lower": Transform("lower", cholesky_whitener(gram)),
    }[kind]
    spec = decompose(w, transform)
    rank = 6
    up, down = factors(spec, rank)
    approx = up @ down
    # full rank reconstructs W exactly
    full_up, full_down = factors(spec, spec.s.numel())
    assert torch.allclose(full_up @ full_down, w, atol=1e-10)
    # the loss in the transformed space is exactly the discarded σ² (truncation-aware)
    err = transform.apply(w - approx)
    assert torch.allclose(err.square().sum(), spec.energy[rank:].sum(), rtol=1e-10)
    assert energy_kept(spec, rank) == pytest.approx(float(spec.energy[:rank].sum() / spec.energy.sum()), rel=1e-12)
    if kind == "lower":
        # whitened error is the true output error on the calibration inputs
        rel = weighted_relative_error(w, approx, gram)
        direct = ((x @ (w - approx).T).norm() / (x @ w.T).norm()).item()
        assert rel == pytest.approx(direct, rel=1e-8)


def test_svd_llm_beats_plain_svd_on_output_error():
    torch.manual_seed(1)
    w = torch.randn(16, 24, dtype=torch.float64)
    x = _activations().double()
    gram = x.T @ x
    errs = {}
    for kind, t in {"svd": Transform("identity"), "svd-llm": Transform("lower", cholesky_whitener(gram))}.items():
        up, down = factors(decompose(w, t), 6)
        errs[kind] = weighted_relative_error(w, up @ down, gram)
    assert errs["svd-llm"] < errs["svd"]


def _specs():
    torch.manual_seed(0)
    specs = []
    for i, (o, n) in enumerate([(32, 32), (64, 32), (32, 64), (48, 48)]):
        s = torch.linspace(3, 0.01, min(o, n), dtype=torch.float64) ** (i + 1)
        specs.append(MatrixSpec(f"m{i}", n, o, energy=s.square()))
    return specs


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_allocation_meets_budget(allocation, ratio):
    specs = _specs()
    ranks = allocate(specs, ratio, allocation)
    dense = sum(s.dense_params for s in specs)
    after = sum(factored_params(s, ranks[s.name]) for s in specs)
    assert after <= (1 - ratio) * dense + max(s.rank_cost for s in specs)  # within one rank step
    for s in specs:
        r = ranks[s.name]
        assert r is None or 1 <= r < s.break_even  # factored only where it saves parameters


@pytest.mark.parametrize("normalise", ["absolute", "relative"])
def test_global_allocation_is_no_worse_than_uniform(normalise):
    """Global allocation minimises the summed (absolute or relative) truncation loss under the budget."""
    specs = _specs()

    def loss(s, r):
        lost = float(s.energy[r:].sum()) if r else 0.0
        return lost / float(s.energy.sum()) if normalise == "relative" else lost

    total = {}
    for allocation in ("uniform", "global"):
        ranks = allocate(specs, 0.4, allocation, normalise)
        total[allocation] = sum(loss(s, ranks[s.name]) for s in specs)
    assert total["global"] <= total["uniform"] * (1 + 1e-9)


def test_rank_floor_is_respected():
    specs = [MatrixSpec(s.name, s.in_features, s.out_features, energy=s.energy, min_rank=5) for s in _specs()]
    ranks = allocate(specs, 0.6, "global")
    assert all(r is None or r >= 5 for r in ranks.values())


def test_global_allocation_keeps_cheap_matrices_dense():
    # One matrix with all the energy and a tiny budget cut: it goes dense (lossless), others pay.
    big = MatrixSpec("big", 32, 32, energy=torch.ones(32, dtype=torch.float64) * 100)
    small = [MatrixSpec(f"s{i}", 32, 32, energy=torch.logspace(0, -6, 32, dtype=torch.float64)) for i in range(3)]
    ranks = allocate([big, *small], 0.3, "global")
    assert ranks["big"] is None


def test_ratio_out_of_range():
    with pytest.raises(UsageError, match="outside"):
        allocate(_specs(), 1.0, "uniform")
