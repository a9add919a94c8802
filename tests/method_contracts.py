"""What every method of a verb must do, as reusable checks, and the case tables read from the registry.

The parametrized tests run these checks on every registered method (`method_names(verb)`), and
tests/test_method_checklists.py runs them on throwaway methods registered through docs/contributing.md's
checklists: a new method is tested by registering it, with no test table to edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from subspace_cli.methods.catalog import methods_for

# Small-model options per method where the defaults do not fit a tiny model: corda's covariance from
# few rows, complementary keeps 2 triplets. Methods not named here run with their defaults.
TINY_OPTIONS = {"adapt": {"corda": {"samples": 4}, "complementary": {"preserve": 2}}}


def method_names(verb: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The registered methods of a verb, sorted: the case table of every per-method test."""
    return sorted(set(methods_for(verb)) - set(exclude))


def low_rank_names() -> list[str]:
    """The compress methods that factor W into one low-rank pair (not a sparse dictionary)."""
    from subspace_cli.methods.compress.base import is_dictionary

    return sorted(name for name, m in methods_for("compress").items() if not is_dictionary(m))


def tiny_options(verb: str, method: str) -> dict:
    return TINY_OPTIONS.get(verb, {}).get(method, {})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@dataclass
class RoundTrip:
    error: float  # max |Δlogit| between the trained model and the PEFT-reloaded adapter
    layers: list[str]  # the targeted layer paths
    deltas: list[str]  # the layer paths the export holds


def adapter_round_trip_error(method: str, model_dir: Path, text_file: Path, tmp_path: Path) -> float:
    return adapter_round_trip(method, model_dir, text_file, tmp_path).error


def adapter_round_trip(method: str, model_dir: Path, text_file: Path, tmp_path: Path) -> RoundTrip:
    """Attach `method`, train 3 large steps in memory, export its exact LoRA, reload it with
    PeftModel.from_pretrained on an untouched base and compare logits."""
    from peft import PeftModel

    from subspace_cli.io.training_data import load_training_data
    from subspace_cli.methods.adapt.base import AdaptContext
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.pipelines.adapt import select_layers
    from subspace_cli.pipelines.adapt_config import AdaptConfig
    from subspace_cli.pipelines.adapter_export import attach_exported
    from subspace_cli.pipelines.trainer import TrainSettings, train

    config = AdaptConfig(model=str(model_dir), out=str(tmp_path / "out"), data=[str(text_file)], method=method,
                         options=tiny_options("adapt", method), rank=2, seqlen=32)
    registered = methods_for("adapt")[method]
    loaded = load_model_and_tokenizer(str(model_dir))
    data = load_training_data(config.data, loaded.tokenizer, seqlen=config.seqlen)
    layers = select_layers(loaded.model, config)

    def run_calibration(model):
        for row in range(4):
            model(input_ids=data.train.input_ids[row:row + 1])

    adapted = registered.attach(loaded.model, layers, config.rank, config.scaling_alpha,
                                registered.make_config(config.options),
                                AdaptContext(torch.Generator().manual_seed(0), run_calibration))
    ids = data.eval.input_ids[:2]
    before = _logits(adapted.model, ids)
    # A large step size so every method's update is far from zero (an export bug cannot hide in a tiny ΔW).
    train(adapted.model, data.train, data.eval, TrainSettings(steps=3, lr=5e-2, warmup_steps=0, eval_every=0))
    trained = _logits(adapted.model, ids)
    assert (trained - before).abs().max() > 1e-3, f"{method}: training did not change the model"

    deltas = adapted.deltas()
    untouched = load_model_and_tokenizer(str(model_dir), with_tokenizer=False).model
    peft_model = attach_exported(untouched, deltas, adapted.use_dora, str(model_dir))
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model_and_tokenizer(str(model_dir), with_tokenizer=False).model,
                                         tmp_path / "adapter").eval()
    return RoundTrip((_logits(reloaded, ids) - trained).abs().max().item(), list(layers), list(deltas))


def merge_contract(method: str, seed: int = 0) -> None:
    """A tensor merge returns a finite float32 tensor of the inputs' shape, the same one for the same
    per-tensor generator, and leaves its inputs untouched."""
    from subspace_cli.methods.merge.base import TensorInputs

    registered = methods_for("merge")[method]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 8, generator=g)
    models = [base + 0.05 * torch.randn(12, 8, generator=g) for _ in range(3)]
    copies = [base.clone(), *(m.clone() for m in models)]

    def inputs():
        return TensorInputs(name="model.layers.0.mlp.up_proj.weight", base=base, models=models,
                            weights=[1.0, 0.5, 0.25], densities=[0.7, 0.7, 0.7],
                            generator=torch.Generator().manual_seed(seed))

    config = registered.make_config({})
    merged = registered.merge(inputs(), config)
    assert merged.shape == base.shape and merged.dtype == torch.float32 and torch.isfinite(merged).all(), method
    assert torch.equal(registered.merge(inputs(), config), merged), f"{method}: not deterministic per tensor"
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *models])), f"{method}: changed its inputs"
