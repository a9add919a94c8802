"""Concrete subspace mask merge (Tang et al. 2023) on a tiny in-memory Llama."""

from __future__ import annotations

import pytest
import torch
import transformers

import subspace_cli.methods.merge.concrete  # noqa: F401  (registers "concrete")
from subspace_cli.errors import UsageError
from subspace_cli.methods.merge.concrete import (
    ConcreteConfig, fit_concrete_mask, merge_with_mask, prepare_concrete, select_targets,
)
from subspace_cli.methods.catalog import get_method
from subspace_cli.methods.merge.base import ModelMerge

TASKS = 2


def tiny_setup(freeze: bool = True):
    """(model with base θ₀, task vectors for the default targets, token batches [8, 16] per task)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    if freeze:
        model.requires_grad_(False)
    params = dict(model.named_parameters())
    names = select_targets(model, None)
    task_vectors = {n: [0.02 * torch.randn_like(params[n]) for _ in range(TASKS)] for n in names}
    batches = [torch.randint(0, 128, (8, 16)) for _ in range(TASKS)]
    return model, task_vectors, batches


def fit(model, task_vectors, batches, seed: int = 0, **options):
    config = ConcreteConfig(**{"steps": 25, "lr": 0.1, "batch_size": 8, **options})
    return fit_concrete_mask(model, task_vectors, batches, config, torch.Generator().manual_seed(seed))


def test_default_targets_are_block_matrices():
    model, task_vectors, _ = tiny_setup()
    names = select_targets(model, None)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(".layers." in n and n.endswith(".weight") for n in names)
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n in names)
    assert select_targets(model, r"mlp\.down_proj") == [n for n in names if "down_proj" in n]


def test_all_ones_mask_is_task_arithmetic_and_zero_lambda_is_base():
    model, task_vectors, _ = tiny_setup()
    params = dict(model.named_parameters())
    base = {n: params[n].detach() for n in task_vectors}
    ones = {n: torch.ones_like(b) for n, b in base.items()}
    merged = merge_with_mask(base, task_vectors, ones, 0.3)
    for n, b in base.items():
        expected = b + 0.3 * sum(task_vectors[n])
        assert merged[n].dtype == torch.float32
        assert (merged[n] - expected).abs().max() <= 1e-6
    same = merge_with_mask(base, task_vectors, ones, 0.0)
    assert all(torch.equal(same[n], base[n]) for n in base)


def test_zero_mask_leaves_base_and_rescale_is_per_tensor():
    model, task_vectors, _ = tiny_setup()
    params = dict(model.named_parameters())
    base = {n: params[n].detach() for n in task_vectors}
    first, second = list(base)[:2]
    half = torch.zeros_like(base[second])
    half.view(-1)[::2] = 1.0  # mean 1/2 -> kept entries scaled by 2
    merged = merge_with_mask(base, task_vectors, {first: torch.zeros_like(base[first]), second: half}, 0.3)
    assert torch.equal(merged[first], base[first])
    expected = base[second] + 0.3 * (2 * half) * sum(task_vectors[second])
    assert (merged[second] - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("objective", ["lm", "entropy"])
def test_training_lowers_objective_and_is_deterministic(objective):
    model, task_vectors, batches = tiny_setup()
    steps = []
    result = fit_concrete_mask(model, task_vectors, batches,
                               ConcreteConfig(steps=25, lr=0.1, batch_size=8, objective=objective),
                               torch.Generator().manual_seed(0), progress=lambda s, l: steps.append((s, l)))
    assert len(result.losses) == 25 and [s for s, _ in steps] == list(range(1, 26))
    assert [l for _, l in steps] == result.losses
    assert sum(result.losses[-5:]) / 5 < result.losses[0]
    again = fit(model, task_vectors, batches, objective=objective)
    assert set(again.merged) == set(task_vectors)
    assert all(torch.equal(result.merged[n], again.merged[n]) for n in task_vectors)
    assert again.losses == result.losses


def test_gradient_reaches_only_the_logits():
    model, task_vectors, batches = tiny_setup(freeze=False)  # even trainable parameters stay untouched
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, task_vectors, batches, steps=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n


def test_binary_export_is_a_zero_one_mask_rescaled():
    model, task_vectors, batches = tiny_setup()
    params = dict(model.named_parameters())
    result = fit(model, task_vectors, batches, lambda_=0.5, export="binary")
    assert result.dropped == []
    for n, d in result.density.items():
        assert 0.0 <= d <= 1.0
        total = sum(task_vectors[n])
        ratio = (result.merged[n] - params[n]) / (0.5 * total)  # = m / mean(m), m in {0, 1}
        keep = total.abs() > 1e-3  # avoid cancellation where Στ ~ 0
        kept = (ratio[keep] - 1 / d).abs() < 1e-2 * (1 / d)
        zero = ratio[keep].abs() < 1e-2 * (1 / d)
        assert bool((kept | zero).all()), n
        assert abs(kept.float().mean().item() - d) < 0.1


def test_continuous_export_density_is_mask_mean():
    model, task_vectors, batches = tiny_setup()
    result = fit(model, task_vectors, batches, steps=3, export="continuous")
    assert all(0.0 < d < 1.0 for d in result.density.values())
    assert result.dropped == []


def test_all_zero_exported_mask_leaves_base_and_is_reported():
    model, task_vectors, batches = tiny_setup()
    params = dict(model.named_parameters())
    result = fit(model, task_vectors, batches, steps=1, lr=1e-3, initial_logit=-20.0, export="binary")
    assert sorted(result.dropped) == sorted(task_vectors)
    assert all(result.density[n] == 0.0 for n in task_vectors)
    assert all(torch.equal(result.merged[n], params[n]) for n in task_vectors)


def test_targets_matching_nothing_list_available_names():
    model, task_vectors, batches = tiny_setup()
    with pytest.raises(UsageError, match="match no parameter; available: model.embed_tokens.weight"):
        select_targets(model, r"no_such_module")
    with pytest.raises(UsageError, match="available"):
        fit(model, task_vectors, batches, targets=r"no_such_module")


def test_input_errors():
    model, task_vectors, batches = tiny_setup()
    with pytest.raises(UsageError, match="task 1 has no rows"):
        fit(model, task_vectors, [batches[0], batches[1][:0]])
    name = next(iter(task_vectors))
    bad = {**task_vectors, name: [task_vectors[name][0], task_vectors[name][1][:, :-1]]}
    with pytest.raises(UsageError, match="has shape"):
        fit(model, bad, batches)
    with pytest.raises(UsageError, match="task batches"):
        fit(model, task_vectors, batches[:1])
    with pytest.raises(UsageError, match="does not cover"):
        fit(model, task_vectors, batches, targets=r"mlp\.")


def test_options_through_the_registry():
    method = get_method("merge", "concrete")
    assert method.config_class is ConcreteConfig and method.prepare is prepare_concrete and isinstance(method, ModelMerge)
    config = method.make_config({"lambda": 0.7, "steps": 5})
    assert config.lambda_ == 0.7 and config.steps == 5
    assert method.make_config({"lambda_": 0.2}).lambda_ == 0.2
    defaults = method.make_config(None)
    assert (defaults.lambda_, defaults.temperature, defaults.initial_logit) == (0.3, 0.5, 0.0)
    assert (defaults.objective, defaults.export, defaults.targets) == ("lm", "continuous", None)
    for options in ({"temperature": 0}, {"temperature": -1.0}, {"objective": "bogus"}, {"export": "soft"},
                    {"steps": 0}, {"lr": 0}, {"batch_size": 0}, {"targets": "("}, {"bogus": 1}):
        with pytest.raises(UsageError, match="method 'concrete' option"):
            method.make_config(options)
