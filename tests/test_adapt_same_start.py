"""Same seed, same start (issue 16): lora, dora-peft and dora share LoRA's initialisation (A Kaiming-
uniform as PEFT's lora_A, B = 0), so under one --seed they must start from bitwise the same adapter."""

from __future__ import annotations

import math

import pytest
import torch

from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.catalog import methods_for
from subspace_cli.pipelines.adapt import select_layers
from subspace_cli.pipelines.adapt_config import AdaptConfig

SHARED_INIT = ("lora", "dora-peft", "dora")


def _start(model_path, text_file, method: str, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer path: (A [r, in], B [out, r])} right after the build, as run_adapt builds it (step 0)."""
    config = AdaptConfig(model=str(model_path), out="unused", data=[str(text_file)], method=method, rank=4, seed=seed)
    model = load_model_and_tokenizer(str(model_path), with_tokenizer=False).model
    layers = select_layers(model, config)
    registered = methods_for("adapt")[method]
    adapted = registered.attach(model, layers, config.rank, config.scaling_alpha,
                               registered.make_config(config.options),
                               AdaptContext(torch.Generator().manual_seed(config.seed)))  # as run_adapt
    root = adapted.model.base_model.model if method != "dora" else adapted.model
    out = {}
    for path in layers:
        layer = root.get_submodule(path)
        if method == "dora":
            out[path] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        else:
            out[path] = (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_lora_dora_peft_and_dora_start_from_the_same_adapter(tiny_llama, text_file, seed):
    starts = {method: _start(tiny_llama, text_file, method, seed) for method in SHARED_INIT}
    reference = starts["lora"]
    assert len(reference) >= 2  # several layers: the draw order matters too
    for method, start in starts.items():
        assert list(start) == list(reference), method
        for path, (a, b) in start.items():
            assert a.dtype == torch.float32 and torch.equal(a, reference[path][0]), (method, path)  # bitwise
            assert not b.any(), (method, path)  # B = 0: every method starts at the base model
            assert a.abs().max() <= 1 / math.sqrt(a.shape[1])  # Kaiming-uniform, a = √5: U(−1/√in, 1/√in)
    layers = list(reference.values())
    assert not torch.equal(layers[0][0], layers[1][0])  # one generator over the layers, not one reseeded per layer


def test_another_seed_another_start(tiny_llama, text_file):
    for method in SHARED_INIT:
        a0 = next(iter(_start(tiny_llama, text_file, method, 0).values()))[0]
        a1 = next(iter(_start(tiny_llama, text_file, method, 1).values()))[0]
        assert not torch.equal(a0, a1), method
