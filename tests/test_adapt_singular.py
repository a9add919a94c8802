"""svfit, svft and complementary on tiny random layers: identity at init, what trains, exact LoRA export,
and complementary's guarantee that W's top-k singular triplets survive any update."""

import pytest
import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.catalog import methods_for
from subspace_cli.pipelines.adapt import select_layers
from subspace_cli.pipelines.adapt_config import AdaptConfig

METHODS = methods_for("adapt")


def _layer(method, base, rank=4, alpha=8.0, seed=0, **options):
    m = METHODS[method]
    return m.attach.factory(base, rank, alpha, m.make_config(options), torch.Generator().manual_seed(seed))


def _linear(out_f=24, in_f=20, seed=0, spectrum=None):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    if spectrum is not None:  # W = Q₁ diag(spectrum) Q₂ᵀ with a known, well-separated spectrum
        q1, _ = torch.linalg.qr(torch.randn(out_f, out_f))
        q2, _ = torch.linalg.qr(torch.randn(in_f, in_f))
        k = len(spectrum)
        with torch.no_grad():
            lin.weight.copy_(q1[:, :k] @ torch.diag(torch.tensor(spectrum)) @ q2[:, :k].T)
    return lin


def _perturb(layer, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _trainable(layer):
    return {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}


def _assert_export_reproduces_forward(layer, base, atol=1e-5):
    """W_base + B·A, applied densely, gives the adapted layer's output."""
    x = torch.randn(7, base.in_features)
    delta = layer.lora_delta()
    assert delta.A.dtype == delta.B.dtype == torch.float32
    assert delta.A.shape == (delta.rank, base.in_features) and delta.B.shape == (base.out_features, delta.rank)
    dense = x @ (base.weight + delta.B @ delta.A).T + base.bias
    torch.testing.assert_close(layer(x), dense, atol=atol, rtol=0)


@pytest.mark.parametrize("method, options", [("svfit", {}), ("svft", {}), ("svft", {"pattern": "random"}),
                                             ("complementary", {"preserve": 3})])
def test_adapted_layer_equals_base_at_init(method, options):
    base = _linear()
    layer = _layer(method, base, **options)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)  # measured 0 (the update is exactly 0)
    assert layer.delta_weight().abs().max() == 0


def test_svfit_trains_r_singular_values_and_exports_exactly():
    base = _linear()
    layer = _layer("svfit", base, rank=5)
    assert _trainable(layer) == {"sigma": 5}
    # Raise the top-5 singular values (by 0.9 … 0.5, keeping their order): an independent float64 SVD of W
    # gives the expected ΔW.
    u, s, vh = torch.linalg.svd(base.weight.detach().double(), full_matrices=False)
    with torch.no_grad():
        layer.sigma.add_(0.9 - 0.1 * torch.arange(5.0))
    change = (layer.sigma - layer.sigma0).detach().double()
    expected = u[:, :5] @ torch.diag(change) @ vh[:5]  # Σ_i d_i u_i v_iᵀ: sign-invariant per pair
    torch.testing.assert_close(layer.delta_weight().double(), expected, atol=1e-5, rtol=0)  # measured 2.9e-6
    # ...so W + ΔW has the trained singular values σ_i + d_i on top
    adapted = torch.linalg.svdvals(base.weight.detach().double() + layer.delta_weight().double())
    torch.testing.assert_close(adapted[:5], s[:5] + change, atol=1e-5, rtol=0)
    _assert_export_reproduces_forward(layer, base)


def test_svfit_on_gpt2_conv1d():
    """transformers' Conv1D stores W as [in, out]; the adapter and its export still use [out, in]."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 20)  # nf = out 24, nx = in 20
    nn.init.normal_(conv.weight)
    layer = _layer("svfit", conv, rank=3)
    _perturb(layer)
    delta = layer.lora_delta()
    x = torch.randn(6, 20)
    expected = x @ (conv.weight.T + delta.B @ delta.A).T + conv.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options, nnz", [
    ({"pattern": "plain"}, 6),
    ({"pattern": "banded", "band": 1}, 6 * 3 - 1 * 2),  # r(2b+1) − b(b+1)
    ({"pattern": "banded"}, 6 * 5 - 2 * 3),  # band 2 by default
    ({"pattern": "banded", "band": 9}, 36),  # the band covers M
    ({"pattern": "random"}, 6 + 6 * 2),  # diagonal + extra 2 per row
    ({"pattern": "random", "extra": 9}, 36),  # capped at r·r
    ({"pattern": "top-k", "extra": 1}, 12),  # k = (1 + extra)·r
])
def test_svft_pattern_sizes(options, nnz):
    base = _linear(20, 20)  # square, for top-k
    layer = _layer("svft", base, rank=6, **options)
    assert _trainable(layer) == {"values": nnz}
    pairs = set(zip(layer.rows.tolist(), layer.cols.tolist()))
    assert len(pairs) == nnz  # no entry twice
    rows, cols = layer.rows, layer.cols
    if options["pattern"] == "banded":
        assert ((rows - cols).abs() <= options.get("band", 2)).all()
    if options["pattern"] in ("plain", "random"):
        assert {(i, i) for i in range(6)} <= pairs


def test_svft_random_pattern_comes_from_the_generator():
    base = _linear()
    a, b, c = (_layer("svft", base, rank=8, seed=seed, pattern="random") for seed in (3, 3, 4))
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
    assert not torch.equal(a.cols, c.cols)


def test_svft_top_k_picks_the_best_aligned_singular_vector_pairs():
    base = _linear(20, 20)
    layer = _layer("svft", base, rank=6, pattern="top-k", extra=1)
    alignment = (layer.u.T @ layer.vh.T).abs()  # [r, r], |u_iᵀ v_j|
    chosen = torch.zeros(6, 6, dtype=torch.bool)
    chosen[layer.rows, layer.cols] = True
    assert alignment[chosen].min() >= alignment[~chosen].max()


def test_svft_core_exports_exactly():
    base = _linear()
    layer = _layer("svft", base, rank=5, pattern="banded", band=1)
    _perturb(layer)
    m = torch.zeros(5, 5)
    m[layer.rows, layer.cols] = layer.values.detach()
    # the frozen factors are W's singular vectors: Wᵀ u_i = σ_i v_i
    s = torch.linalg.svdvals(base.weight.detach())[:5]
    torch.testing.assert_close(base.weight.detach().T @ layer.u, layer.vh.T * s, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), layer.u @ m @ layer.vh, atol=1e-5, rtol=0)
    _assert_export_reproduces_forward(layer, base)


def test_complementary_keeps_the_top_singular_triplets_exactly():
    spectrum = [8.0, 6.0, 4.0] + [1.0 - 0.05 * i for i in range(17)]
    base = _linear(24, 20, spectrum=spectrum)
    layer = _layer("complementary", base, rank=4, preserve=3)
    assert _trainable(layer) == {"lora_A": 4 * 20, "lora_B": 24 * 4}
    _perturb(layer)
    with torch.no_grad():  # scale B so ‖ΔW‖₂ = 1.5: large, yet below the gap σ₃ − σ₄ = 3 (order is kept)
        layer.lora_B.mul_(1.5 / torch.linalg.matrix_norm(layer.delta_weight(), ord=2))
    w = base.weight.detach().double()
    delta = layer.delta_weight().double()
    assert torch.linalg.matrix_norm(delta, ord=2) > 1.4  # a real update, not a no-op
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w + delta, full_matrices=False)
    assert ((s2[:3] - s[:3]).abs() / s[:3]).max() < 1e-4  # measured 1e-9
    assert ((u[:, :3] * u2[:, :3]).sum(0).abs() > 1 - 1e-5).all()  # measured 1 − 8e-15
    assert ((vh[:3] * vh2[:3]).sum(1).abs() > 1 - 1e-5).all()
    # the same A, B as plain LoRA (no projection) would move the top singular vectors
    lora = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    u3, _, _ = torch.linalg.svd(w + lora, full_matrices=False)
    assert ((u[:, :3] * u3[:, :3]).sum(0).abs() < 1 - 1e-3).any()  # measured 1 − 7e-3
    _assert_export_reproduces_forward(layer, base)


def test_complementary_init_is_peft_kaiming_and_seeded():
    base = _linear()
    a, b = _layer("complementary", base, seed=5, preserve=2), _layer("complementary", base, seed=5, preserve=2)
    assert torch.equal(a.lora_A, b.lora_A)
    assert a.lora_A.abs().max() <= 20 ** -0.5  # PEFT's kaiming_uniform_(a=√5): U(−1/√in, 1/√in)
    assert a.scaling == 8.0 / 4


def test_complementary_preserve_too_large_names_the_layer():
    model = nn.Module()
    model.proj = nn.Linear(8, 6)
    build = METHODS["complementary"].attach
    config = METHODS["complementary"].make_config({"preserve": 6})
    with pytest.raises(UsageError, match=r"layer proj .*preserve must be ≤ min\(out, in\) − 1 = 5"):
        build(model, {"proj": model.proj}, 2, 2.0, config, AdaptContext(torch.Generator().manual_seed(0)))
    assert isinstance(model.proj, nn.Linear)  # checked before anything was wrapped


def test_svft_top_k_refuses_non_square_layers_by_name():
    model = nn.Module()
    model.up = nn.Linear(8, 16)
    config = METHODS["svft"].make_config({"pattern": "top-k"})
    with pytest.raises(UsageError, match=r"layer up \[16×8\] is not square"):
        METHODS["svft"].attach(model, {"up": model.up}, 2, 2.0, config, AdaptContext(torch.Generator()))


def test_non_linear_layers_are_refused():
    with pytest.raises(UsageError, match="Conv2d"):
        _layer("svfit", nn.Conv2d(4, 4, 3), rank=2)


@pytest.mark.parametrize("method, options, message", [
    ("svft", {"pattern": "diagonal"}, "option 'pattern'"),
    ("svft", {"band": 0}, "option 'band'"),
    ("svft", {"extra": 0}, "option 'extra'"),
    ("complementary", {"preserve": -1}, "option 'preserve'"),
    ("complementary", {"dropout": 1.0}, "option 'dropout'"),
    ("svfit", {"preserve": 2}, "valid options: none"),
])
def test_bad_options_are_usage_errors(method, options, message):
    with pytest.raises(UsageError, match=message):
        METHODS[method].make_config(options)


@pytest.mark.parametrize("method, options, per_layer", [
    ("svfit", {}, lambda out_f, in_f: 2),
    ("svft", {"pattern": "plain"}, lambda out_f, in_f: 2),
    ("complementary", {"preserve": 2}, lambda out_f, in_f: 2 * (out_f + in_f)),
])
def test_tiny_llama_starts_at_the_base_model(tiny_llama, tmp_path, method, options, per_layer):
    loaded = load_model_and_tokenizer(str(tiny_llama), with_tokenizer=False)
    ids = torch.arange(40).reshape(2, 20) + 4
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    config = AdaptConfig(model=str(tiny_llama), out=str(tmp_path / "o"), method=method, rank=2, options=options)
    layers = select_layers(loaded.model, config)
    shapes = {path: (m.out_features, m.in_features) for path, m in layers.items()}
    m = METHODS[method]
    context = AdaptContext(torch.Generator().manual_seed(0))
    adapted = m.attach(loaded.model, layers, 2, 2.0, m.make_config(options), context)
    trainable = {n: p.numel() for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == sum(per_layer(*shape) for shape in shapes.values())
    with torch.no_grad():
        after = adapted.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert set(adapted.deltas()) == set(layers)
