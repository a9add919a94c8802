"""adapt on mixture-of-experts models (issue 16): tiny Mixtral and Qwen2-MoE, whose experts are 3-D
parameters (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) beside a router. lora adapts
them as PEFT does (target_parameters), the adapter reloads in PEFT with the trained logits and --merge
writes that model; a method that cannot adapt them exits 2 instead of skipping them."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_architectures import MOE, make_tiny_arch

from subspace_cli.errors import UsageError
from subspace_cli.io.training_data import load_training_data
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.adapt.experts import ExpertLoraDelta
from subspace_cli.methods.catalog import methods_for
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.pipelines.adapt import run_adapt, select_layers
from subspace_cli.pipelines.adapt_config import AdaptConfig
from subspace_cli.pipelines.adapter_export import attach_exported
from subspace_cli.pipelines.trainer import TrainSettings, train
from subspace_cli.walk import ExpertStack

TINY = dict(rank=2, steps=3, seqlen=32, batch_size=4, warmup_steps=0, eval_every=0, lr=5e-2)
STACKS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: make_tiny_arch(name, root / name) for name in MOE}


def _config(model, out, data, **kw):
    return AdaptConfig(model=str(model), out=str(out), data=[str(data)], **{**TINY, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base(path):
    return load_model_and_tokenizer(str(path), with_tokenizer=False).model


@pytest.mark.parametrize("arch", MOE)
def test_experts_are_targets(moe, arch, tmp_path):
    """Both stacks of every block are targets, as [E, out, in]; the router (not a Linear) is not."""
    layers = select_layers(_base(moe[arch]), _config(moe[arch], tmp_path / "o", "x"))
    stacks = {path: m for path, m in layers.items() if isinstance(m, ExpertStack)}
    assert sorted(stacks) == sorted(f"model.layers.{i}.{s}" for i in range(2) for s in STACKS)
    intermediate = 64 if arch == "mixtral" else 32
    assert stacks["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * intermediate, 32)
    assert stacks["model.layers.0.mlp.experts.down_proj"].slice_shape == (32, intermediate)
    assert not any(path.endswith("mlp.gate") for path in layers)


@pytest.mark.parametrize("arch", MOE)
def test_lora_adapter_on_experts_reloads_in_peft(moe, arch, text_file, tmp_path):
    """Train lora on attention and experts in memory, export, PeftModel.from_pretrained on an untouched base:
    the trained logits (1e-4), with every expert's pair trained and saved in PEFT's nested layout."""
    from peft import PeftModel

    path = moe[arch]
    config = _config(path, tmp_path / "out", text_file)
    lora = methods_for("adapt")["lora"]
    loaded = load_model_and_tokenizer(str(path))
    data = load_training_data(config.data, loaded.tokenizer, seqlen=config.seqlen)
    layers = select_layers(loaded.model, config)
    adapted = lora.attach(loaded.model, layers, config.rank, config.scaling_alpha, lora.make_config({}),
                         AdaptContext(torch.Generator().manual_seed(0)))
    ids = data.eval.input_ids[:2]
    before = _logits(adapted.model, ids)
    train(adapted.model, data.train, data.eval, TrainSettings(steps=3, lr=5e-2, warmup_steps=0, eval_every=0))
    trained = _logits(adapted.model, ids)
    assert (trained - before).abs().max() > 1e-3
    deltas = adapted.deltas()
    experts = {p: d for p, d in deltas.items() if isinstance(d, ExpertLoraDelta)}
    assert len(experts) == 4
    for p, d in experts.items():
        assert d.A.shape[:2] == (4, 2) and d.B.shape[0] == 4 and d.rank == 2
        # Every expert the router sent tokens to was trained (B starts at zero).
        assert all(d.B[e].abs().max() > 0 for e in range(4)), p

    peft_model = attach_exported(_base(path), deltas, adapted.use_dora, str(path))
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(experts)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    # PEFT nests one ParamWrapper per stack on the experts module, the first registered (gate_up_proj) inside.
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in keys
    reloaded = PeftModel.from_pretrained(_base(path), tmp_path / "adapter").eval()
    err = (_logits(reloaded, ids) - trained).abs().max().item()
    assert err < 1e-4, f"{arch}: max |Δlogit| {err:.2e}"  # measured 0 (same fp32 ops) on both


@pytest.mark.parametrize("arch", MOE)
def test_merge_writes_the_adapted_model_in_the_base_layout(moe, arch, text_file, tmp_path):
    """--merge: the merged checkpoint holds the base's tensor names (per-expert files) and gives the
    adapter's logits; the report lists the stacks with their [E, out, in] and trainable counts."""
    from peft import PeftModel

    path, out = moe[arch], tmp_path / "out"
    report = run_adapt(_config(path, out, text_file, merge=True))
    stacks = {a.name: a for a in report.adapters if ".experts." in a.name}
    assert len(stacks) == 4
    for a in stacks.values():
        e, out_f, in_f = a.shape
        assert a.trainable == e * 2 * (out_f + in_f) and a.export_rank == 2
    assert report.training.trainable_params == sum(a.trainable for a in report.adapters)
    assert load_file(out / "merged" / "model.safetensors").keys() == load_file(path / "model.safetensors").keys()
    ids = torch.arange(40).reshape(2, 20) + 4
    adapter = PeftModel.from_pretrained(_base(path), out).eval()
    err = (_logits(_base(out / "merged").eval(), ids) - _logits(adapter, ids)).abs().max().item()
    assert err <= 1e-5  # measured ≤ 1.2e-7
    assert (_logits(adapter, ids) - _logits(_base(path).eval(), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("method", sorted(set(methods_for("adapt")) - {"lora"}))
def test_methods_that_cannot_adapt_experts_exit_2(moe, method, text_file, tmp_path):
    """The default targets include the experts: a method that adapts Linear layers only says so and how to
    go on (never a silent skip), before any training."""
    with pytest.raises(UsageError, match=rf"method '{method}' adapts Linear layers; experts are 3-D parameters "
                                         r"\(model\.layers\.0\.mlp\.experts\.gate_up_proj \[4×128×32\].*"
                                         r"use --method lora, or --exclude experts"):
        run_adapt(_config(moe["mixtral"], tmp_path / "out", text_file, method=method, steps=1))
    assert not (tmp_path / "out").exists()


def test_excluding_experts_is_said_in_the_report(moe, text_file, tmp_path):
    report = run_adapt(_config(moe["mixtral"], tmp_path / "out", text_file, method="svfit", exclude="experts",
                               steps=1))
    assert not any(".experts." in a.name for a in report.adapters)
    assert any("4 of 4 expert stacks (3-D parameters) are not adapted" in note for note in report.notes)


def test_lora_dropout_on_experts_exits_2(moe, text_file, tmp_path):
    with pytest.raises(UsageError, match=r"dropout=0\.1.*expert parameters.*-O dropout=0, or --exclude experts"):
        run_adapt(_config(moe["mixtral"], tmp_path / "out", text_file, options={"dropout": 0.1}, steps=1))


def test_rank_above_an_expert_matrix_exits_2(moe, tmp_path):
    """Qwen2-MoE's experts here are [32×32] (moe_intermediate_size 32): rank 33 does not fit one."""
    config = AdaptConfig(model=str(moe["qwen2_moe"]), out=str(tmp_path / "o"), rank=33, exclude="self_attn|shared")
    with pytest.raises(UsageError, match=r"--rank 33 exceeds min\(out, in\) = 32 each expert of "
                                         r"model\.layers\.0\.mlp\.experts\.(gate_up|down)_proj"):
        select_layers(_base(moe["qwen2_moe"]), config)


def test_routers_are_left_out_by_default_and_said_so(moe, tmp_path):
    """Qwen2-MoE's shared_expert_gate [1, H] is a Linear router: left out by default (with a note), adapted
    when --targets names it."""
    model = _base(moe["qwen2_moe"])
    notes = []
    layers = select_layers(model, AdaptConfig(model=str(moe["qwen2_moe"]), out=str(tmp_path / "o"), rank=2), notes)
    assert not any(p.endswith("shared_expert_gate") for p in layers)
    assert any(p.endswith("shared_expert.gate_proj") for p in layers)  # the shared expert itself is adapted
    assert any("routers are not adapted by default" in n and "shared_expert_gate" in n for n in notes)
    named = select_layers(model, AdaptConfig(model=str(moe["qwen2_moe"]), out=str(tmp_path / "o"), rank=1,
                                             targets="shared_expert_gate"))
    assert sorted(named) == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
