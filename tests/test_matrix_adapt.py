"""The verb matrix (issue 16), adapt: on every dense architecture of tiny_architectures.py, every
adapter method trains a few steps and its exported adapter, loaded by
`PeftModel.from_pretrained(untouched base, out)`, gives the trained model's logits within 1e-4, fused
projections (Phi-3's qkv_proj / gate_up_proj) and q/k/v biases (Qwen2) included. The verb itself
(`run_adapt`, with --merge) runs once per architecture, one method each, in rotation.

The MoE architectures are covered by the tests of MoE adapt (experts as PEFT target_parameters).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from matrix_helpers import DENSE, SEQLEN, arch_dir, logits, one_thread, texts  # noqa: F401 - one_thread is a fixture

from method_contracts import method_names
from subspace_cli.walk import block_linears, find_blocks
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.io.training_data import load_training_data
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.catalog import methods_for
from subspace_cli.pipelines.adapt import run_adapt, select_layers
from subspace_cli.pipelines.adapt_config import AdaptConfig
from subspace_cli.pipelines.adapter_export import attach_exported
from subspace_cli.pipelines.trainer import TrainSettings, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every family: the slow tier

ADAPT_METHODS = method_names("adapt")
# Small-model settings per method: corda's covariance from few rows, complementary keeps 2 triplets.
OPTIONS = {"corda": {"samples": 4}, "complementary": {"preserve": 2}}
TOLERANCE = 1e-4  # max |Δlogit| of the reloaded adapter; measured ≤ 4e-7 on every (architecture, method)
# The verb end to end: one method per architecture, so that every export path meets a different family.
VERB_METHOD = dict(zip(DENSE, ["pissa", "dora", "corda", "svft", "olora", "flora", "svfit", "complementary"]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """name -> (model dir, the loaded base (never trained: each case deep-copies it), training data)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = arch_dir(tmp_path_factory, name)
            loaded = load_model_and_tokenizer(str(path))
            data = load_training_data([str(texts(tmp_path_factory)[0])], loaded.tokenizer, seqlen=SEQLEN)
            cache[name] = (path, loaded.model, data)
        return cache[name]

    return get


def _block_linear_names(model) -> set[str]:
    """Leaf names of the Linear layers in the blocks: q_proj, ..., or qkv_proj / gate_up_proj (Phi-3)."""
    blocks = find_blocks(model)
    return {path.rsplit(".", 1)[-1] for i, b in enumerate(blocks.modules) for path in block_linears(b, blocks.block_path(i))}


@pytest.mark.parametrize("method", ADAPT_METHODS)
@pytest.mark.parametrize("name", DENSE)
def test_every_adapter_reloads_in_peft(prepared, tmp_path, name, method):
    from peft import PeftModel

    path, base, data = prepared(name)
    config = AdaptConfig(model=str(path), out=str(tmp_path / "out"), data=["unused"], method=method, rank=2,
                         seqlen=SEQLEN, options=OPTIONS.get(method, {}))
    registered = methods_for("adapt")[method]
    model = copy.deepcopy(base)
    layers = select_layers(model, config)
    assert {p.rsplit(".", 1)[-1] for p in layers} == _block_linear_names(base)  # every Linear, fused ones as one

    def run_calibration(m):
        for row in range(4):
            m(input_ids=data.train.input_ids[row:row + 1])

    adapted = registered.attach(model, layers, config.rank, config.scaling_alpha, registered.make_config(config.options),
                               AdaptContext(torch.Generator().manual_seed(0), run_calibration))
    ids = data.eval.input_ids[:2]
    before = logits(adapted.model, ids)
    # A large step size so every method's update is far from zero (an export bug cannot hide in a tiny ΔW).
    train(adapted.model, data.train.head(8), data.eval.head(2),
          TrainSettings(steps=2, lr=5e-2, warmup_steps=0, eval_every=0, batch_size=2))
    trained = logits(adapted.model, ids)
    assert (trained - before).abs().max() > 1e-3  # training changed the model

    attach_exported(copy.deepcopy(base), adapted.deltas(), adapted.use_dora, str(path)).save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()  # an untouched copy
    err = (logits(reloaded, ids) - trained).abs().max().item()
    assert err < TOLERANCE, f"{name}/{method}: max |Δlogit| {err:.2e}"


@pytest.mark.parametrize("name", DENSE)
def test_adapt_verb_writes_an_adapter_and_a_merged_model(tmp_path_factory, tmp_path, name):
    """run_adapt end to end: the adapter targets every block Linear by name (PEFT's target_modules), loads on
    the untouched base, and equals the merged checkpoint written beside it."""
    from peft import PeftModel

    path = arch_dir(tmp_path_factory, name)
    method = VERB_METHOD[name]
    out = tmp_path / "out"
    report = run_adapt(AdaptConfig(
        model=str(path), out=str(out), data=[str(texts(tmp_path_factory)[0])], method=method, rank=2, steps=2,
        seqlen=SEQLEN, batch_size=2, warmup_steps=0, eval_every=0, eval_rows=2, lr=1e-2, merge=True,
        options=OPTIONS.get(method, {})))
    assert report.training.steps == 2 and report.training.trainable_params > 0
    untouched = load_model_and_tokenizer(str(path), with_tokenizer=False).model
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {t.rsplit(".", 1)[-1] for t in targets} == _block_linear_names(untouched)
    ids = torch.randint(4, 100, (2, SEQLEN), generator=torch.Generator().manual_seed(0))
    base_logits = logits(untouched, ids)
    adapter = PeftModel.from_pretrained(untouched, out).eval()
    merged = load_model_and_tokenizer(str(out / "merged"), with_tokenizer=False).model
    adapter_logits = logits(adapter, ids)
    assert (adapter_logits - base_logits).abs().max() > 1e-4  # training moved the model
    err = (logits(merged, ids) - adapter_logits).abs().max().item()
    assert err < TOLERANCE, f"{name}/{method}: merged against adapter, max |Δlogit| {err:.2e}"
