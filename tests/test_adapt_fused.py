"""Adapters on fused projections (issue 16): Phi-3 keeps q, k, v in one `qkv_proj` [3·H, H] (here
[64, 32] with GQA) and gate, up in one `gate_up_proj` [2·I, H]. PEFT targets each fused Linear with one
adapter; so does every adapt method here, and every method's saved adapter reloads in PEFT on the
untouched base with the trained model's logits."""

import pytest
import torch

from subspace_cli.io.models import load_model_and_tokenizer
from subspace_cli.io.training_data import load_training_data
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.registry import methods_for
from subspace_cli.pipelines.adapt import select_layers
from subspace_cli.pipelines.adapt_config import AdaptConfig
from subspace_cli.pipelines.adapter_export import attach_exported
from subspace_cli.pipelines.trainer import TrainSettings, train
from tiny_architectures import make_tiny_arch

OPTIONS = {"corda": {"samples": 4}, "complementary": {"preserve": 2}}
ADAPT_METHODS = sorted(methods_for("adapt"))


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return make_tiny_arch("phi3", tmp_path_factory.mktemp("fused") / "phi3")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fused_projections_are_targeted_whole(phi3, tmp_path):
    """One adapter per fused Linear, at its full [out, in]: nothing is split per q/k/v or gate/up."""
    model = load_model_and_tokenizer(str(phi3), with_tokenizer=False).model
    layers = select_layers(model, AdaptConfig(model=str(phi3), out=str(tmp_path / "o"), rank=2))
    shapes = {path.split(".", 3)[-1]: tuple(m.weight.shape) for path, m in layers.items() if ".0." in path}
    assert shapes == {"self_attn.qkv_proj": (64, 32), "self_attn.o_proj": (32, 32),
                      "mlp.gate_up_proj": (128, 32), "mlp.down_proj": (32, 64)}


@pytest.mark.parametrize("method", ADAPT_METHODS)
def test_every_method_reloads_in_peft_on_phi3(phi3, text_file, tmp_path, method):
    """Train in memory, export, PeftModel.from_pretrained on an untouched Phi-3: the same logits (1e-4)."""
    from peft import PeftModel

    config = AdaptConfig(model=str(phi3), out=str(tmp_path / "out"), data=[str(text_file)], rank=2, seqlen=32,
                         method=method, options=OPTIONS.get(method, {}))
    registered = methods_for("adapt")[method]
    loaded = load_model_and_tokenizer(str(phi3))
    data = load_training_data(config.data, loaded.tokenizer, seqlen=config.seqlen)
    layers = select_layers(loaded.model, config)
    assert any(path.endswith("qkv_proj") for path in layers) and any(path.endswith("gate_up_proj") for path in layers)

    def run_calibration(model):
        for row in range(4):
            model(input_ids=data.train.input_ids[row:row + 1])

    adapted = registered.build(loaded.model, layers, config.rank, config.scaling_alpha,
                               registered.make_config(config.options),
                               AdaptContext(torch.Generator().manual_seed(0), run_calibration))
    ids = data.eval.input_ids[:2]
    before = _logits(adapted.model, ids)
    # A large step so every update is far from zero: an export bug cannot hide in a tiny ΔW.
    train(adapted.model, data.train, data.eval, TrainSettings(steps=3, lr=5e-2, warmup_steps=0, eval_every=0))
    trained = _logits(adapted.model, ids)
    assert (trained - before).abs().max() > 1e-3
    deltas = adapted.deltas()
    assert {p for p in deltas if p.endswith(("qkv_proj", "gate_up_proj"))}, "fused projections were not adapted"

    untouched = load_model_and_tokenizer(str(phi3), with_tokenizer=False).model
    attach_exported(untouched, deltas, adapted.use_dora, str(phi3)).save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model_and_tokenizer(str(phi3), with_tokenizer=False).model,
                                         tmp_path / "adapter").eval()
    err = (_logits(reloaded, ids) - trained).abs().max().item()
    assert err < 1e-4, f"{method}: max |Δlogit| {err:.2e}"  # measured ≤ 1.5e-7 on every method
