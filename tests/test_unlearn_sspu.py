"""SSPU building blocks: the TopK SAE (Gao et al. 2024) and the subspace algebra (arXiv 2505.24428)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from torch.nn.utils import parametrize

from subspace_cli.methods.unlearn.sae import SAEConfig, TopKSAE, train_sae
from subspace_cli.methods.unlearn.subspaces import (
    bake, control_vector, orthonormal_basis, restrict_updates, select_features,
)


def _off_span(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(I − QQᵀ) x in float64, for x [d] or [d, n]."""
    q, x = basis.double(), x.double()
    return x - q @ (q.T @ x)


# ---------------------------------------------------------------- orthonormal_basis / control_vector

def test_orthonormal_basis_full_rank():
    directions = torch.randn(10, 24, generator=torch.Generator().manual_seed(0))
    q = orthonormal_basis(directions)
    assert q.shape == (24, 10) and q.dtype == directions.dtype
    assert torch.allclose(q.T @ q, torch.eye(10), atol=1e-6)
    assert _off_span(q, directions.T).norm() <= 1e-5 * directions.norm()  # span(Q) ⊇ span(rows)


@pytest.mark.parametrize("m, d, rank", [(9, 24, 4), (40, 16, 6)])
def test_orthonormal_basis_rank_deficient(m, d, rank):
    g = torch.Generator().manual_seed(1)
    independent = torch.randn(rank, d, generator=g)
    mix = torch.randn(m - rank, rank, generator=g)
    # Dependent rows early (a duplicate, a combination, a zero row), where unpivoted QR leaves arbitrary columns.
    combined = mix[:m - rank - 2] @ independent
    directions = torch.cat([independent[:1], independent[:1], torch.zeros(1, d), combined[:-1],
                            independent[1:], combined[-1:]])
    assert directions.shape[0] == m
    q = orthonormal_basis(directions)
    assert q.shape == (d, rank) == (d, int(torch.linalg.matrix_rank(directions)))
    assert torch.allclose(q.T @ q, torch.eye(rank), atol=1e-6)
    assert _off_span(q, directions.T).norm() <= 1e-5 * directions.norm()


def test_orthonormal_basis_empty():
    assert orthonormal_basis(torch.zeros(0, 8)).shape == (8, 0)
    assert orthonormal_basis(torch.zeros(3, 8)).shape == (8, 0)


def test_control_vector_lies_in_the_span():
    q = orthonormal_basis(torch.randn(6, 32, generator=torch.Generator().manual_seed(2)))
    u = control_vector(q, 3.5, torch.Generator().manual_seed(3))
    assert u.shape == (32,) and u.dtype == q.dtype
    assert _off_span(q, u).norm() <= 1e-6 * u.double().norm()
    assert abs(float(u.norm()) - 3.5) <= 1e-5
    assert torch.equal(u, control_vector(q, 3.5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError):
        control_vector(torch.zeros(32, 0), 1.0, torch.Generator())


# ---------------------------------------------------------------- restrict_updates / bake

def test_restrict_updates_confines_the_change_and_bakes():
    torch.manual_seed(4)
    layer = nn.Linear(16, 32)  # W [out=32 (the "residual stream"), in=16]
    w0 = layer.weight.detach().clone()
    keys = set(layer.state_dict())
    q = orthonormal_basis(torch.randn(5, 32))  # [32, 5]
    coef = restrict_updates(layer, q)
    assert coef.shape == (5, 16) and coef.requires_grad and not coef.any()
    assert not layer.parametrizations.weight.original.requires_grad
    optimizer = torch.optim.Adam([coef], lr=1e-2)
    x, target = torch.randn(64, 16), torch.randn(64, 32)
    for _ in range(10):
        optimizer.zero_grad()
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
    assert torch.equal(layer.parametrizations.weight.original, w0)  # the original never moves
    delta = (layer.weight - w0).detach()  # [32, 16]
    assert delta.norm() > 1e-3
    assert _off_span(q, delta).norm() <= 1e-5 * delta.double().norm()

    expected = (w0 + q @ coef).detach()
    bake(layer)
    assert not parametrize.is_parametrized(layer)
    assert type(layer.weight) is nn.Parameter and torch.equal(layer.weight.detach(), expected)
    assert set(layer.state_dict()) == keys
    bake(layer)  # a no-op on a plain layer


def test_restrict_updates_rejects_a_basis_of_the_wrong_side():
    with pytest.raises(ValueError):
        restrict_updates(nn.Linear(16, 32), torch.eye(16)[:, :4])  # [in, r], not [out, r]


# ---------------------------------------------------------------- TopK SAE

def _k_sparse_data(n: int = 4096, d: int = 32, atoms: int = 128, k: int = 4):
    """x = 3 · c D + 1 with D [atoms, d] unit rows and exactly k coefficients in [0.5, 1.5) per row."""
    g = torch.Generator().manual_seed(5)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    support = torch.rand(n, atoms, generator=g).topk(k, dim=-1).indices
    coefficients = torch.zeros(n, atoms).scatter(1, support, 0.5 + torch.rand(n, k, generator=g))
    return 3.0 * coefficients @ dictionary + 1.0, dictionary


def test_sae_fits_k_sparse_data():
    x, dictionary = _k_sparse_data()
    fit = train_sae(x, SAEConfig(k=4), torch.Generator().manual_seed(0))  # F = 8·32 = 256, 400 steps of 512
    # Measured 0.117 (dead 0.043). Not ~0: with 128 coherent atoms in d = 32 the linear encoder cannot
    # read the coefficients exactly (longer runs plateau at ~0.11; 32 atoms measure 0.04). Threshold 0.2.
    assert fit.normalised_mse < 0.2
    assert 0.0 <= fit.dead_fraction < 1.0 and fit.seconds > 0
    # The dictionary is recovered: atoms with a decoder row at cosine > 0.95 (measured: 127 of 128).
    best = (fit.sae.decoder @ dictionary.T).abs().max(0).values  # [atoms]
    assert (best > 0.95).float().mean() >= 0.9
    assert torch.allclose(fit.sae.decoder.norm(dim=-1), torch.ones(256), atol=1e-5)
    recon, z = fit.sae(x[:100])
    assert ((z > 0).sum(-1) <= 4).all() and (z >= 0).all()
    assert torch.allclose(recon, fit.sae.decode(fit.sae.encode(x[:100])))


def test_sae_is_deterministic_for_a_generator():
    x, _ = _k_sparse_data(n=1024)
    config = SAEConfig(k=4, steps=40, batch_size=256, dead_tokens=512)  # AuxK active too
    first = train_sae(x, config, torch.Generator().manual_seed(7))
    second = train_sae(x, config, torch.Generator().manual_seed(7))
    assert torch.equal(first.sae.decoder, second.sae.decoder)
    assert first.normalised_mse == second.normalised_mse
    other = train_sae(x, config, torch.Generator().manual_seed(8))
    assert not torch.equal(first.sae.decoder, other.sae.decoder)


def test_sae_on_a_tiny_llama_layer():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hidden = model(torch.randint(0, 128, (64, 32)), output_hidden_states=True).hidden_states[1]
    acts = hidden.reshape(-1, 32)  # [2048, 32], output of block 0
    steps = []
    fit = train_sae(acts, SAEConfig(k=8), torch.Generator().manual_seed(0), progress=steps.append)
    assert steps == list(range(1, 401))
    # Measured 0.014, dead 0.06 (k = 8 of F = 256, 400 steps of 512 tokens); threshold 0.05.
    assert fit.normalised_mse < 0.05
    assert 0.0 <= fit.dead_fraction <= 1.0
    # Decoder rows are directions in the raw residual stream: decoding is in the activations' units.
    recon, _ = fit.sae(acts)
    assert (acts - recon).pow(2).sum() < 0.1 * (acts - acts.mean(0)).pow(2).sum()


# ---------------------------------------------------------------- select_features

def _planted_sae(d: int = 32) -> TopKSAE:
    """Identity dictionary: feature i is coordinate i, so z = ReLU(TopK(x))."""
    sae = TopKSAE(d, d, k=6)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_select_features_finds_planted_forget_features():
    g = torch.Generator().manual_seed(9)
    planted, common = [3, 7, 11], list(range(16, 32))
    retain = torch.zeros(256, 32)
    retain[:, common] = torch.rand(256, len(common), generator=g)  # general features only
    retain[:, :3] = 0.3 * torch.rand(256, 3, generator=g)  # weak features 0–2, seen on both sets
    forget = retain[:128].clone()
    forget[:, 16:20] = 0.0  # features 16–19 fire on retain only
    forget[:, planted] = 2.0 + torch.rand(128, 3, generator=g)  # the forget topic
    selection = select_features(_planted_sae(), forget, retain, n_relevant=3, n_irrelevant=4)
    assert sorted(selection.relevant) == planted and not selection.notes
    assert not set(planted) & set(selection.irrelevant)
    assert sorted(selection.irrelevant) == [16, 17, 18, 19]  # active on retain, silent on forget
    assert selection.contrast.shape == (32,) and (selection.contrast[planted] > 0).all()

    # Asking for more relevant features than there are keeps only contrast > 0, with a note.
    wide = select_features(_planted_sae(), forget, retain, n_relevant=10, n_irrelevant=4)
    assert set(planted) <= set(wide.relevant) and all(wide.contrast[i] > 0 for i in wide.relevant)
    assert len(wide.relevant) < 10 and wide.notes
    assert not set(wide.relevant) & set(wide.irrelevant)
