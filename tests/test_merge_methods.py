"""Per-tensor merge methods: parity with mergekit 0.1.5's own functions (linear, task arithmetic, TIES,
DARE), the exact guarantees every method gives (λ = α = 0 → base, identical inputs), and the algebra of
the singular-basis merges (TSV's orthogonal bases, Iso's flat spectrum)."""

import pytest
import torch

from subspace_cli.errors import UsageError
from subspace_cli.methods.merge.base import TensorInputs, merged_sparsity, task_vector_stats
from subspace_cli.methods.merge.singular import cts_split, polar_factor
from subspace_cli.methods.merge.task_arithmetic import elect_sign, magnitude_trim, random_drop
from subspace_cli.methods.catalog import methods_for
from subspace_cli.methods.registry import Needs

METHODS = methods_for("merge")
ELEMENTWISE = ["linear", "task-arithmetic", "ties", "dare-linear", "dare-ties"]
SINGULAR = ["tsv", "iso-c", "iso-cts"]
WITH_BASE = ["task-arithmetic", "ties", "dare-linear", "dare-ties", *SINGULAR]
MERGEKIT_NAME = {"linear": "linear", "task-arithmetic": "task_arithmetic", "ties": "ties",
                 "dare-linear": "dare_linear", "dare-ties": "dare_ties"}


def _random(shape, n=3, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def _inputs(base, models, weights=None, densities=None, seed=0):
    n = len(models)
    return TensorInputs(name="layer.weight", base=base, models=models, weights=weights or [1.0] * n,
                        densities=densities or [1.0] * n, generator=torch.Generator().manual_seed(seed))


def _merge(method, inputs, **options):
    m = METHODS[method]
    return m.merge(inputs, m.make_config(options))


def _mergekit(method, base, models, weights, densities, seed=0, **parameters):
    pytest.importorskip("mergekit")  # a dev extra: only the parity tests need it
    from mergekit.merge_methods import merge_tensors

    torch.manual_seed(seed)  # mergekit's DARE draws from the global generator
    if method == "linear":
        return merge_tensors(models, "linear", parameters={"weight": weights, **parameters})
    return merge_tensors([base, *models], MERGEKIT_NAME[method], base_index=0,
                         parameters={"weight": weights, "density": densities, **parameters})


# ----------------------------------------------------------------------------- registry


def test_registered_with_papers_and_needs():
    assert set(ELEMENTWISE + SINGULAR) <= set(METHODS)
    for name in ELEMENTWISE + SINGULAR:
        m = METHODS[name]
        assert m.verb == "merge" and "arXiv" in m.paper and m.summary
        assert m.needs == (set() if name == "linear" else {Needs.BASE})
        for field_name, field in m.config_class.model_fields.items():
            assert field.description, f"{name}.{field_name} has no description"


def test_mergekit_defaults():
    cfg = {name: METHODS[name].make_config({}) for name in ELEMENTWISE}
    assert cfg["linear"].normalize is True
    assert (cfg["task-arithmetic"].lambda_, cfg["task-arithmetic"].normalize) == (1.0, False)
    assert (cfg["ties"].normalize, cfg["ties"].rescale, cfg["ties"].consensus) == (True, False, "sum")
    for dare in ("dare-linear", "dare-ties"):
        assert (cfg[dare].normalize, cfg[dare].rescale) == (False, True)


def test_lambda_alias():
    for key in ("lambda", "lambda_"):
        assert METHODS["ties"].make_config({key: "0.5"}).lambda_ == 0.5


@pytest.mark.parametrize("method,options", [
    ("linear", {"lambda": 1.0}), ("task-arithmetic", {"lambda": "abc"}), ("ties", {"consensus": "bogus"}),
    ("dare-ties", {"consensus": "majority"}), ("dare-linear", {"rescale": "maybe"}), ("tsv", {"fraction": 0}),
    ("tsv", {"alpha": "inf"}), ("iso-c", {"common_fraction": 0.5}), ("iso-cts", {"common_fraction": 1.5}),
])
def test_bad_options_raise_usage_error(method, options):
    with pytest.raises(UsageError, match=method):
        METHODS[method].make_config(options)


# ----------------------------------------------------------------------------- mergekit parity


PARITY = [
    ("linear", {}), ("linear", {"normalize": False}),
    ("task-arithmetic", {}), ("task-arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {}), ("ties", {"normalize": False, "rescale": True, "lambda": 1.5}),
    ("dare-linear", {}), ("dare-linear", {"normalize": True, "rescale": False, "lambda": 0.5}),
    ("dare-ties", {}), ("dare-ties", {"normalize": True, "lambda": 2.0}),
]


@pytest.mark.parametrize("shape", [(24, 16), (40,)])
@pytest.mark.parametrize("method,options", PARITY)
def test_parity_with_mergekit(method, options, shape):
    base, models = _random(shape, seed=1)
    weights = [0.5, 1.0, -0.3]
    for densities in ([1.0, 1.0, 1.0], [0.3, 0.55, 0.9]):
        ours = _merge(method, _inputs(base, models, weights, densities, seed=7), **options)
        theirs = _mergekit(method, base, models, weights, densities, seed=7, **options)
        assert ours.dtype == torch.float32 and ours.shape == base.shape
        # DARE below density 1 too: our per-tensor generator draws the masks mergekit draws from the
        # global generator under the same seed.
        assert (ours - theirs).abs().max() <= 1e-6, (method, options, densities)


@pytest.mark.parametrize("method,weights,options", [
    ("task-arithmetic", [1.0, -1.0], {"normalize": True}),  # |Σw| < 1e-8: divide by 1
    ("dare-linear", [0.5, -0.5], {"normalize": True}),
    ("ties", [1.0, -1.0], {}),  # agreeing weights cancel on some entries: divide by 1 there
    ("linear", [1.0, -1.0], {}),  # no guard in mergekit: inf / NaN (the pipeline rejects those)
])
def test_parity_zero_weight_sum(method, weights, options):
    base, models = _random((12, 10), n=2, seed=2)
    ours = _merge(method, _inputs(base, models, weights), **options)
    theirs = _mergekit(method, base, models, weights, [1.0, 1.0], **options)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, equal_nan=True)
    assert torch.isfinite(ours).all() == (method != "linear")


def test_magnitude_trim_parity_with_ties_in_magnitude():
    pytest.importorskip("mergekit")
    from mergekit.sparsify import RescaleNorm, magnitude

    # Deltas of bf16 checkpoints repeat magnitudes: which equal entries survive must match too.
    g = torch.Generator().manual_seed(3)
    delta = (torch.randint(-4, 5, (20, 16), generator=g) * 0.125).float()
    delta[0, :4] = -0.0
    for density in (0.001, 0.1, 0.37, 0.5, 0.999, 1.0):
        for rescale in (False, True):
            ours = magnitude_trim(delta, density, rescale)
            theirs = magnitude(delta, density, RescaleNorm.l1 if rescale else None)
            assert torch.equal(ours, theirs), (density, rescale)
    assert int(magnitude_trim(delta, 0.001).ne(0).sum()) == 1  # k = max(1, int(density·numel))


def test_random_drop_parity_and_determinism():
    pytest.importorskip("mergekit")
    from mergekit.sparsify import RescaleNorm, bernoulli

    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(4))
    for rescale in (False, True):
        torch.manual_seed(11)
        theirs = bernoulli(delta, 0.3, RescaleNorm.l1 if rescale else None)
        ours = random_drop(delta, 0.3, rescale, torch.Generator().manual_seed(11))
        assert torch.equal(ours, theirs)
    kept = random_drop(delta, 0.3, False, torch.Generator().manual_seed(11)).ne(0).float().mean()
    assert 0.2 < kept < 0.4
    assert random_drop(delta, 1.0, True, torch.Generator()) is delta  # density 1: untouched, no draw


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_sign_election_parity(consensus):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    g = torch.Generator().manual_seed(5)
    weighted = torch.randint(-2, 3, (4, 10, 8), generator=g).float()  # zeros and tied totals
    assert torch.equal(elect_sign(weighted, consensus), get_mask(weighted, method=consensus))


def test_dare_deterministic_per_seed():
    base, models = _random((16, 12), seed=6)
    densities = [0.5] * 3
    a, b, c = (_merge("dare-ties", _inputs(base, models, densities=densities, seed=s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- guarantees of every method


@pytest.mark.parametrize("shape", [(20, 12), (12,)])
@pytest.mark.parametrize("method", WITH_BASE)
def test_zero_scale_returns_base_bitwise(method, shape):
    base, models = _random(shape, seed=8)
    key = "alpha" if method in SINGULAR else "lambda"
    merged = _merge(method, _inputs(base, models, densities=[0.5] * 3), **{key: 0.0})
    assert torch.equal(merged, base) and merged is not base


@pytest.mark.parametrize("method,options", [
    ("linear", {}), ("task-arithmetic", {"normalize": True}), ("ties", {}),
    ("dare-linear", {"normalize": True}), ("dare-ties", {"normalize": True}),
])
def test_identical_models_give_the_model(method, options):
    base, (model,) = _random((24, 16), n=1, seed=9)
    merged = _merge(method, _inputs(base, [model] * 3, weights=[0.2, 0.5, 1.3]), **options)
    assert (merged - model).abs().max() <= 1e-6


def test_linear_needs_no_base():
    _, models = _random((8, 6), n=2, seed=10)
    merged = _merge("linear", TensorInputs("w", None, models, [1.0, 3.0], [1.0, 1.0], torch.Generator()))
    assert torch.allclose(merged, 0.25 * models[0] + 0.75 * models[1], atol=1e-6)


@pytest.mark.parametrize("method", SINGULAR)
def test_non_matrix_tensors_take_the_mean_task_vector(method):
    base, models = _random((16,), seed=11)
    weights = [1.0, 0.5, 2.0]
    merged = _merge(method, _inputs(base, models, weights), alpha=0.5)
    mean = sum(w * (m - base) for w, m in zip(weights, models)) / 3
    assert torch.allclose(merged, base + 0.5 * mean, atol=1e-6)


# ----------------------------------------------------------------------------- tsv


def _orthonormal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def test_polar_factor_has_orthonormal_columns():
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(12))
    p = polar_factor(x)
    assert torch.allclose(p.T @ p, torch.eye(24), atol=1e-5)
    # the nearest orthonormal matrix: x = P·(symmetric positive definite)
    h = p.T @ x
    assert torch.allclose(h, h.T, atol=1e-4) and torch.linalg.eigvalsh(h).min() > 0


def test_tsv_equals_task_arithmetic_on_orthogonal_task_vectors():
    m, n, k = 40, 32, 16  # T = 2 tasks, k = min(m, n) // T triplets each
    u, v = _orthonormal(m, 13), _orthonormal(n, 14)
    g = torch.Generator().manual_seed(15)
    deltas = [(u[:, i * k:(i + 1) * k] * (torch.rand(k, generator=g) + 0.5)) @ v[:, i * k:(i + 1) * k].T
              for i in range(2)]
    base = torch.randn(m, n, generator=g)
    inputs = _inputs(base, [base + d for d in deltas], weights=[0.7, 1.2])
    tsv = _merge("tsv", inputs)
    assert (tsv - _merge("task-arithmetic", inputs)).abs().max() <= 1e-5


def test_tsv_keeps_a_shared_low_rank_direction():
    g = torch.Generator().manual_seed(16)
    base = torch.randn(24, 20, generator=g)
    model = base + 0.1 * torch.outer(torch.randn(24, generator=g), torch.randn(20, generator=g))
    assert (_merge("tsv", _inputs(base, [model] * 3)) - model).abs().max() <= 1e-5
    # one model: k = min(m, n), every triplet kept, so TSV is task arithmetic
    _, (full,) = _random((24, 20), n=1, seed=17)
    assert (_merge("tsv", _inputs(base, [full])) - full).abs().max() <= 1e-5


def test_tsv_truncates_identical_full_rank_task_vectors():
    # Documented behaviour: N identical Δ come back as Δ's top min(m, n)//N triplets, not as Δ.
    base, (model,) = _random((24, 16), n=1, seed=18)
    merged = _merge("tsv", _inputs(base, [model] * 2))
    u, s, vh = torch.linalg.svd(model - base)
    assert (merged - base - (u[:, :8] * s[:8]) @ vh[:8]).abs().max() <= 1e-5


def _authors_tsv(deltas):
    """TSV-M as the authors' code computes it: fixed [m, r] buffers, k = int(r/T) blocks, zero padding."""
    r = min(deltas[0].shape)
    k = int(r / len(deltas))
    u_all, s_all, vh_all = torch.zeros(deltas[0].shape[0], r), torch.zeros(r), torch.zeros(r, deltas[0].shape[1])
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        u_all[:, i * k:(i + 1) * k], s_all[i * k:(i + 1) * k], vh_all[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    pu, _, qu = torch.linalg.svd(u_all, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh_all, full_matrices=False)
    return (pu @ qu) @ torch.diag(s_all) @ (pv @ qv)


@pytest.mark.parametrize("shape,n", [((32, 24), 3), ((20, 28), 4), ((24, 16), 2)])
def test_tsv_matches_the_authors_formulation(shape, n):
    base, models = _random(shape, n=n, seed=23)
    expected = base + _authors_tsv([m - base for m in models])
    assert (_merge("tsv", _inputs(base, models)) - expected).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- iso-c / iso-cts


def _spectrum(merged, base):
    return torch.linalg.svdvals(merged - base)


def test_iso_c_flattens_the_spectrum_to_its_mean():
    base, models = _random((32, 20), seed=19)
    weights = [1.0, 0.5, 2.0]
    merged = _merge("iso-c", _inputs(base, models, weights), alpha=1.5)
    summed = sum(w * (m - base) for w, m in zip(weights, models))
    sigma_bar = torch.linalg.svdvals(summed).mean()
    assert torch.allclose(_spectrum(merged, base), torch.full((20,), 1.5 * sigma_bar), rtol=1e-4)


def test_iso_c_of_identical_rank_one_models_is_their_sum():
    # A rank-1 spectrum is already flat, so iso-c is task arithmetic (a sum, not a mean: α scales it).
    g = torch.Generator().manual_seed(20)
    base = torch.randn(16, 12, generator=g)
    delta = 0.1 * torch.outer(torch.randn(16, generator=g), torch.randn(12, generator=g))
    merged = _merge("iso-c", _inputs(base, [base + delta] * 3))
    assert (merged - (base + 3 * delta)).abs().max() <= 1e-5


def test_iso_cts_flat_spectrum_and_its_limit_iso_c():
    base, models = _random((32, 24), n=4, seed=21)
    cts = _merge("iso-cts", _inputs(base, models))
    s = _spectrum(cts, base)
    assert torch.allclose(s, s.mean().expand(24), rtol=1e-4)  # all 24 directions, one singular value
    iso_c = _merge("iso-c", _inputs(base, models))
    assert (_merge("iso-cts", _inputs(base, models), common_fraction=1.0) - iso_c).abs().max() <= 1e-5
    assert not torch.allclose(cts, iso_c, atol=1e-4)  # task-specific directions change the merge


def _authors_iso_cts(deltas, fraction):
    """Iso-CTS as the authors' code computes it (unit weights)."""
    r, t = min(deltas[0].shape), len(deltas)
    common = int(r * fraction)
    common = r - round((r - common) / t) * t
    per_task = (r - common) // t
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for d in deltas:
        outside = d - u[:, :common] @ u[:, :common].T @ d
        ut, st, vht = torch.linalg.svd(outside, full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vhs.append(vht[:per_task])
    pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    pv, _, qv = torch.linalg.svd(torch.cat(vhs, 0), full_matrices=False)
    return torch.cat(ss).mean() * (pu @ qu) @ (pv @ qv)


@pytest.mark.parametrize("shape,n,fraction", [((32, 24), 3, 0.8), ((20, 28), 4, 0.5), ((24, 16), 2, 0.8)])
def test_iso_cts_matches_the_authors_formulation(shape, n, fraction):
    base, models = _random(shape, n=n, seed=24)
    expected = base + _authors_iso_cts([m - base for m in models], fraction)
    merged = _merge("iso-cts", _inputs(base, models), common_fraction=fraction)
    assert (merged - expected).abs().max() <= 1e-5


def test_cts_split_matches_the_authors_rounding():
    assert cts_split(64, 2, 0.8) == (52, 6)  # int(51.2) = 51; round(13 / 2) = 6 (half to even)
    assert cts_split(64, 8, 0.8) == (48, 2)  # round(13 / 8) = 2
    assert cts_split(20, 3, 1.0) == (20, 0)
    assert cts_split(3, 2, 0.0) == (1, 1)  # would be (−1, 2) without the guard
    for rank, tasks, fraction in [(64, 3, 0.8), (24, 4, 0.5), (7, 9, 0.1)]:
        common, per_task = cts_split(rank, tasks, fraction)
        assert common >= 0 and per_task >= 0 and common + per_task * tasks == rank


# ----------------------------------------------------------------------------- diagnostics


def test_task_vector_stats_sign_conflict():
    base = torch.zeros(5)
    models = [torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0]),
              torch.tensor([-1.0, 2.0, 0.0, 0.0, 1.0]),
              torch.tensor([0.0, 3.0, 0.0, 0.0, -1.0])]
    # entries with ≥ 2 nonzero: 0, 1, 4; opposite signs in 0 and 4
    assert task_vector_stats(base, models)["sign_conflict"] == pytest.approx(2 / 3)
    assert task_vector_stats(base, [base + 1, base])["sign_conflict"] == 0.0


def test_merged_sparsity_of_a_ties_merge():
    base, models = _random((20, 10), n=1, seed=22)
    merged = _merge("ties", _inputs(base, models, densities=[0.25]))
    assert merged_sparsity(base, merged) == pytest.approx(0.75)
