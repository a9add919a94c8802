"""merge on mixture-of-experts models (issue 16): tiny Mixtral and Qwen2-MoE, in the per-expert layout
transformers 5 writes (Mixtral `block_sparse_moe.experts.e.w1/w2/w3`, Qwen2-MoE `mlp.experts.e.*_proj`)
and in the stacked layout the models hold in memory (`mlp.experts.gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]). Checked: parity with mergekit 0.1.5, SVD merges per expert, and LoRA adapters
on expert parameters (PEFT target_parameters) merged as PEFT's merge_and_unload merges them."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from subspace_cli.errors import UsageError
from subspace_cli.io.lazy_checkpoint import LazyCheckpoint
from subspace_cli.io.lora_checkpoint import LoraCheckpoint
from subspace_cli.methods.merge.base import TensorInputs
from subspace_cli.methods.catalog import methods_for
from subspace_cli.modules.loading import load_model
from subspace_cli.pipelines.merge import run_merge
from subspace_cli.pipelines.merge_config import MergeConfig
from subspace_cli.pipelines.merge_yaml import read_merge_file
from tiny_architectures import make_tiny_arch
from tiny_models import make_char_tokenizer

SVD_METHODS = ["tsv", "iso-c", "iso-cts"]


def merge(out: Path, *models, **options) -> Path:
    """The merge verb in this process (what `subspace merge` runs, without a new interpreter per call)."""
    run_merge(MergeConfig(models=[str(m) for m in models], out=str(out), **options))
    return out


def _perturbed(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tuned' copy: every tensor plus seeded noise, saved as transformers saves it."""
    model = load_model(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    make_char_tokenizer().save_pretrained(out)
    return out


def _stacked(src: Path, out: Path) -> Path:
    """The same model with its tensors stored as the model holds them (experts as 3-D stacks)."""
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in load_model(src).state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((src / "config.json").read_text())
    make_char_tokenizer().save_pretrained(out)
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{(arch, layout): {"base", "a", "b"}}; layout 'experts' (per-expert files) or 'stacked'."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        base = make_tiny_arch(arch, root / arch / "base")
        family = {"base": base, "a": _perturbed(base, root / arch / "a", 1),
                  "b": _perturbed(base, root / arch / "b", 2)}
        out[arch, "experts"] = family
        out[arch, "stacked"] = {k: _stacked(v, root / arch / f"{k}-stacked") for k, v in family.items()}
    return out


def test_layouts_are_what_the_tests_assume(families):
    per_expert = tensors(families["mixtral", "experts"]["base"])
    stacked = tensors(families["mixtral", "stacked"]["base"])
    assert per_expert["model.layers.0.block_sparse_moe.experts.3.w1.weight"].shape == (64, 32)
    assert stacked["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 128, 32)
    assert stacked["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 64)


# ----------------------------------------------------------------------------- mergekit parity

MERGEKIT_CASES = {
    "linear": {"parameters": {}, "weights": [(0.7, None), (0.4, None)], "base": False},
    "task_arithmetic": {"parameters": {"lambda": 0.8}, "weights": [(0.7, None), (0.4, None)], "base": True},
    "ties": {"parameters": {"normalize": True, "lambda": 0.9}, "weights": [(0.7, 0.5), (0.4, 0.3)], "base": True},
}


@pytest.mark.parametrize("method", sorted(MERGEKIT_CASES))
@pytest.mark.parametrize("arch, layout", [("mixtral", "experts"), ("qwen2_moe", "experts"), ("mixtral", "stacked")])
def test_same_model_as_mergekit(tmp_path, families, arch, layout, method):
    """mergekit 0.1.5 reads either layout (Qwen2-MoE through its inferred architecture, no JSON for it)
    and writes stacks; we keep the base's layout. Compared as loaded by transformers, every tensor is
    mergekit's (≤ 1e-6), except TIES on per-expert files: there each expert's matrix is a tensor and is
    trimmed to --density on its own, where mergekit trims the whole [E, out, in] stack."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as run_mergekit

    family, case = families[arch, layout], MERGEKIT_CASES[method]
    models = [{"model": str(family[name]), "parameters": {"weight": w} | ({"density": d} if d else {})}
              for (w, d), name in zip(case["weights"], ("a", "b"))]
    config = {"merge_method": method, "models": models, "parameters": case["parameters"], "dtype": "float32"}
    if case["base"]:
        config["base_model"] = str(family["base"])
    (tmp_path / "mergekit.yaml").write_text(yaml.safe_dump(config))
    run_mergekit(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"),
                 MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    # The same file, read as `subspace merge mergekit.yaml` reads it.
    run_merge(MergeConfig(**read_merge_file(tmp_path / "mergekit.yaml"), out=str(tmp_path / "ours")))
    assert tensors(tmp_path / "ours").keys() == tensors(family["base"]).keys()  # the base's layout is kept
    ours, theirs = load_model(tmp_path / "ours").state_dict(), load_model(tmp_path / "theirs").state_dict()
    assert ours.keys() == theirs.keys()
    error = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    stacks = {k for k in ours if ".experts." in k}
    assert len(stacks) == 4
    if method == "ties" and layout == "experts":
        assert max(error[k] for k in ours if k not in stacks) <= 1e-6
        assert min(error[k] for k in stacks) > 1e-3  # per-expert against per-stack trimming
    else:
        worst = max(error.values())
        assert worst <= 1e-6, f"{arch}/{layout} {method}: max |ours − mergekit| = {worst:.2e}"  # measured 0


def test_ties_trims_each_expert_file_to_its_own_density(tmp_path, families):
    """On per-expert files every expert's matrix keeps its own top --density of |Δ|."""
    family = families["mixtral", "experts"]
    out = merge(tmp_path / "ties", family["a"], family["a"], base=str(family["base"]), method="ties", density=[0.25])
    merged, base = tensors(out), tensors(family["base"])
    for e in range(4):
        name = f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"
        kept = (merged[name] != base[name]).float().mean().item()
        assert kept == pytest.approx(0.25, abs=1 / merged[name].numel()), name


# ----------------------------------------------------------------------------- SVD merges per expert


def _inputs(name, base, models):
    return TensorInputs(name=name, base=base, models=models, weights=[0.7, 0.4], densities=[1.0, 1.0],
                        generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_svd_merges_take_each_expert_slice_as_a_matrix(method):
    """A stack [E, out, in] merges as E separate matrices: slice e of the result is the method on slice e
    (bitwise), and differs from what the stack would give as a non-matrix (the mean task vector)."""
    build = methods_for("merge")[method].merge
    config = methods_for("merge")[method].make_config({})
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 12, 8, generator=g)
    models = [base + 0.1 * torch.randn(4, 12, 8, generator=g) for _ in range(2)]
    merged = build(_inputs("model.layers.0.mlp.experts.down_proj", base, models), config)
    assert merged.shape == base.shape
    for e in range(4):
        alone = build(_inputs(f"model.layers.0.mlp.experts.{e}.down_proj.weight", base[e], [m[e] for m in models]),
                      config)
        assert torch.equal(merged[e], alone)
    mean = base + sum(w * (m - base) for w, m in zip([0.7, 0.4], models)) / 2
    assert (merged - mean).abs().max() > 1e-2
    # A 3-D tensor that is not an expert stack (a conv kernel) still takes the mean task vector.
    conv = build(_inputs("model.layers.0.conv1d.weight", base, models), config)
    assert torch.allclose(conv, mean, atol=1e-6)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_svd_merges_agree_across_layouts_on_down_proj(tmp_path, families, method):
    """down_proj[e] of the stacked layout is experts.e.w2 of the per-expert one: merging either file
    layout gives the same expert matrices (1e-6; the gate_up stack is [w1; w3], one matrix per expert, so
    it is not the separate w1 and w3 merges)."""
    outs = {}
    for layout in ("experts", "stacked"):
        family = families["mixtral", layout]
        outs[layout] = merge(tmp_path / layout, family["a"], family["b"], base=str(family["base"]), method=method,
                             weights=[0.7, 0.4])
    per_expert, stacked = tensors(outs["experts"]), tensors(outs["stacked"])
    for layer in range(2):
        stack = stacked[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(4):
            w2 = per_expert[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
            assert (stack[e] - w2).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- LoRA on expert parameters


def _expert_adapter(base: Path, out: Path, seed: int, **extra):
    """A PEFT LoRA on q_proj and on both expert stacks (target_parameters), B randomised; rank 3 on one
    stack through rank_pattern. Returns PEFT's merged model."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={r"layers\.1\.mlp\.experts\.down_proj": 3}, **extra)
    model = peft.get_peft_model(load_model(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    return model.merge_and_unload()


@pytest.mark.parametrize("arch, layout", [("mixtral", "experts"), ("qwen2_moe", "experts"), ("mixtral", "stacked")])
def test_lora_on_expert_parameters_merges_as_peft_does(tmp_path, families, arch, layout):
    """LoraCheckpoint of a target_parameters adapter = PEFT's merge_and_unload, saved as transformers saves
    it (per-expert files) or compared as held in memory (stacked files), every tensor within 1e-6."""
    base = families[arch, layout]["base"]
    merged = _expert_adapter(base, tmp_path / "adapter", seed=3)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    if layout == "experts":
        merged.save_pretrained(tmp_path / "peft-merged")
        expected = tensors(tmp_path / "peft-merged")
    else:
        expected = {k: v.detach() for k, v in merged.state_dict().items()}
    untouched = tensors(base)
    with LazyCheckpoint(base) as checkpoint, LoraCheckpoint(checkpoint, tmp_path / "adapter") as lora:
        assert set(lora.names()) == set(expected)
        # q_proj (2 layers) and every expert tensor of both stacks changed, nothing else.
        experts = {n for n in lora.names() if ".experts." in n}
        assert set(lora.targeted) == experts | {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
        for name in lora.names():
            got = lora.get(name)
            assert (got - expected[name]).abs().max().item() <= 1e-6, name
            if name in experts:
                assert (got - untouched[name]).abs().max() > 1e-3, name  # the delta reached this tensor
        assert not lora._pending  # every per-expert delta was handed out


def test_merge_verb_takes_expert_adapters_as_inputs(tmp_path, families):
    """Two target_parameters adapters merged by task arithmetic = the same merge of PEFT's merged models."""
    family = families["qwen2_moe", "experts"]
    for i, seed in enumerate((4, 5)):
        _expert_adapter(family["base"], tmp_path / f"adapter{i}", seed).save_pretrained(tmp_path / f"full{i}")
        make_char_tokenizer().save_pretrained(tmp_path / f"full{i}")
    common = dict(base=str(family["base"]), method="task-arithmetic", weights=[0.6, 0.5])
    a = tensors(merge(tmp_path / "from-adapters", tmp_path / "adapter0", tmp_path / "adapter1", **common))
    b = tensors(merge(tmp_path / "from-models", tmp_path / "full0", tmp_path / "full1", **common))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_expert_adapter_on_another_architecture_exits_2(tmp_path, families):
    """An adapter whose expert stacks do not fit the base (trained on Qwen2-MoE, applied to Mixtral):
    a UsageError (exit 2) naming the parameter, nothing written."""
    _expert_adapter(families["qwen2_moe", "experts"]["base"], tmp_path / "adapter", seed=6)
    mixtral = families["mixtral", "experts"]
    with pytest.raises(UsageError, match=r"mlp\.experts\.(gate_up|down)_proj"):
        merge(tmp_path / "out", tmp_path / "adapter", mixtral["a"], base=str(mixtral["base"]), force_base=True)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- concrete


def test_concrete_maps_renamed_tensors_and_refuses_split_ones(tmp_path, families):
    """concrete trains its mask on the model in memory, whose names are not all the checkpoint's: Mixtral's
    router (mlp.gate in memory, block_sparse_moe.gate on disk) is masked under its stored name; an expert
    stack that the checkpoint keeps per expert cannot carry one mask and exits 2 naming it. Before: KeyError."""
    from tiny_models import write_text

    family = families["mixtral", "experts"]
    text = write_text(tmp_path / "text.txt")
    common = dict(base=str(family["base"]), method="concrete", data=[str(text)] * 2, samples=2, seqlen=16)
    report = run_merge(MergeConfig(models=[str(family["a"]), str(family["b"])], out=str(tmp_path / "out"),
                                   options={"steps": 2}, **common))
    masked = {t.name for t in report.merge.tensors if t.mask_density is not None}
    assert "model.layers.0.block_sparse_moe.gate.weight" in masked
    assert "model.layers.1.self_attn.q_proj.weight" in masked
    with pytest.raises(UsageError, match=r"concrete targets 'model\.layers\.0\.mlp\.experts\.gate_up_proj'.*"
                                         r"per expert"):
        run_merge(MergeConfig(models=[str(family["a"]), str(family["b"])], out=str(tmp_path / "out2"),
                              options={"steps": 2, "targets": "experts"}, **common))
