"""Adapters on fused projections (issue 16): Phi-3 keeps q, k, v in one `qkv_proj` [3·H, H] (here
[64, 32] with GQA) and gate, up in one `gate_up_proj` [2·I, H]. PEFT targets each fused Linear with one
adapter; so does every adapt method here, and every method's saved adapter reloads in PEFT on the
untouched base with the trained model's logits."""

import pytest
import torch

from method_contracts import adapter_round_trip, method_names
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.pipelines.adapt import select_layers
from subspace_cli.pipelines.adapt_config import AdaptConfig
from tiny_architectures import make_tiny_arch

ADAPT_METHODS = method_names("adapt")


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
    trip = adapter_round_trip(method, phi3, text_file, tmp_path)
    assert any(path.endswith("qkv_proj") for path in trip.layers) and any(path.endswith("gate_up_proj") for path in trip.layers)
    assert {p for p in trip.deltas if p.endswith(("qkv_proj", "gate_up_proj"))}, "fused projections were not adapted"
    assert trip.error < 1e-4, f"{method}: max |Δlogit| {trip.error:.2e}"  # measured ≤ 1.5e-7 on every method
