"""The verb matrix (issue 16), merge and unlearn. On every dense architecture of
tiny_architectures.py: linear, task_arithmetic and ties give mergekit 0.1.5's tensors (it has an
architecture definition for each of them), and every merge method runs and writes a checkpoint that
plain transformers loads. On every architecture, MoE included: ga, grad-diff, rmu and sspu change
exactly the tensors they target, and nothing else.

MoE merge is covered by the tests of MoE merge (experts tensor by tensor).
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from matrix_helpers import (  # noqa: F401 - one_thread is a fixture
    ARCHITECTURES,
    DENSE,
    MOE,
    SEQLEN,
    arch_dir,
    family,
    logits,
    one_thread,
    probe_ids,
    tensors,
    texts,
)

from method_contracts import method_names
from subspace_cli.walk import find_blocks
from subspace_cli.modules.loading import load_model
from subspace_cli.pipelines.merge import run_merge
from subspace_cli.pipelines.merge_config import MergeConfig
from subspace_cli.pipelines.merge_yaml import read_merge_file
from subspace_cli.pipelines.unlearn import run_unlearn
from subspace_cli.pipelines.unlearn_config import UnlearnConfig

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every family: the slow tier

# ----------------------------------------------------------------------------- merge

MERGEKIT_CASES = {
    "linear": {"parameters": {}, "weights": [(0.7, None), (0.4, None)], "base": False},
    "task_arithmetic": {"parameters": {"lambda": 0.8}, "weights": [(0.7, None), (0.4, None)], "base": True},
    "ties": {"parameters": {"normalize": True, "lambda": 0.9}, "weights": [(0.7, 0.5), (0.4, 0.3)], "base": True},
}
MERGE_METHODS = method_names("merge")
SPARSIFYING = {"ties", "dare-linear", "dare-ties"}  # take --density


def _mergekit_config(models: dict, method: str) -> dict:
    case = MERGEKIT_CASES[method]
    entries = []
    for (weight, density), label in zip(case["weights"], ("a", "b")):
        params = {"weight": weight} | ({"density": density} if density is not None else {})
        entries.append({"model": str(models[label]), "parameters": params})
    config = {"merge_method": method, "models": entries, "parameters": case["parameters"], "dtype": "float32"}
    if case["base"]:
        config["base_model"] = str(models["base"])
    return config


@pytest.mark.parametrize("method", sorted(MERGEKIT_CASES))
@pytest.mark.parametrize("name", DENSE)
def test_same_tensors_as_mergekit(tmp_path_factory, tmp_path, name, method):
    """The same mergekit YAML through mergekit and through `subspace merge CONFIG.yaml`."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    config = _mergekit_config(family(tmp_path_factory, name), method)
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    mergekit_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"),
                   MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    run_merge(MergeConfig(**read_merge_file(path), out=str(tmp_path / "ours")))
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    assert worst <= 1e-6, f"{name}/{method}: max |ours − mergekit| = {worst:.2e}"  # measured 0.0


@pytest.mark.parametrize("method", MERGE_METHODS)
@pytest.mark.parametrize("name", DENSE)
def test_every_merge_method_runs_and_loads(tmp_path_factory, tmp_path, name, method):
    from transformers import AutoModelForCausalLM

    models = family(tmp_path_factory, name)
    extra = {}
    if method in SPARSIFYING:
        extra["density"] = [0.5]
    if method == "concrete":
        extra.update(data=[str(t) for t in texts(tmp_path_factory)], samples=4, seqlen=SEQLEN,
                     options={"steps": 2, "batch_size": 2})
    out = tmp_path / "out"
    report = run_merge(MergeConfig(models=[str(models["a"]), str(models["b"])], base=str(models["base"]),
                                   method=method, out=str(out), **extra))
    merged, base = tensors(out), tensors(models["base"])
    assert merged.keys() == base.keys()  # tied embeddings stay tied: one stored tensor, as in the base
    for key, value in merged.items():
        assert value.shape == base[key].shape and value.dtype == base[key].dtype, key
        assert torch.isfinite(value).all(), key
    assert {t.name for t in report.merge.tensors} <= set(base)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    got = logits(model, probe_ids())
    assert torch.isfinite(got).all()
    assert (got - logits(load_model(models["base"]), probe_ids())).abs().max() > 1e-4  # the merge moved the base


# ----------------------------------------------------------------------------- unlearn

UNLEARN_METHODS = ["ga", "grad-diff", "rmu", "sspu"]
FAST = {"steps": 2, "batch_size": 2}
SSPU_FAST = {"sae_steps": 20, "relevant": 4, "irrelevant": 4, "sae_k": 4, "sae_features": 64}


def _unlearn(tmp_path_factory, out, name: str, method: str, **options):
    forget, retain = texts(tmp_path_factory)
    options = {**FAST, **(SSPU_FAST if method == "sspu" else {}), **options}
    return run_unlearn(UnlearnConfig(
        model=str(arch_dir(tmp_path_factory, name)), method=method, forget=str(forget), retain=str(retain),
        out=str(out), forget_samples=4, retain_samples=4, seqlen=SEQLEN, eval_seqlen=SEQLEN, eval_chars=400,
        options=options))


def _check_only_targeted_changed(tmp_path_factory, out, name: str, report) -> set[str]:
    before, after = tensors(arch_dir(tmp_path_factory, name)), tensors(out)
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and changed == set(report.unlearn.targeted)  # every targeted tensor moved, nothing else did
    blocks = find_blocks(load_model(arch_dir(tmp_path_factory, name))).path
    assert all(key.startswith(f"{blocks}.") for key in changed), changed
    assert {c.name for c in report.unlearn.changed} == changed
    assert report.unlearn.unchanged == len(before) - len(changed)  # MoE: read in the checkpoint's own layout
    for label, ppl in report.perplexity.items():
        assert math.isfinite(ppl.before) and math.isfinite(ppl.after) and ppl.before > 1, (label, ppl)
    return changed


@pytest.mark.parametrize("name, method", [(name, method) for name in ARCHITECTURES for method in UNLEARN_METHODS])
def test_unlearn_changes_only_the_targeted_tensors(tmp_path_factory, tmp_path, name, method):
    """The method's default targets on each architecture (its own choice of blocks and modules)."""
    report = _unlearn(tmp_path_factory, tmp_path / "out", name, method)
    _check_only_targeted_changed(tmp_path_factory, tmp_path / "out", name, report)


@pytest.mark.parametrize("name", MOE)
def test_unlearn_on_moe_blocks_with_named_modules(tmp_path_factory, tmp_path, name):
    """With modules named (the attention output), rmu runs on MoE models and touches only them."""
    report = _unlearn(tmp_path_factory, tmp_path / "out", name, "rmu", modules=r"self_attn\.o_proj")
    changed = _check_only_targeted_changed(tmp_path_factory, tmp_path / "out", name, report)
    assert all(key.endswith("self_attn.o_proj.weight") for key in changed), changed


@pytest.mark.parametrize("name", MOE)
def test_unlearn_diff_reads_the_expert_tensors_of_the_checkpoint(tmp_path_factory, tmp_path, name):
    """transformers holds experts as 3-D parameters and stores them per expert (and renames Mixtral's router):
    the diff compares in the checkpoint's layout, so every stored tensor is counted."""
    report = _unlearn(tmp_path_factory, tmp_path / "out", name, "rmu", modules=r"self_attn\.o_proj")
    before = tensors(arch_dir(tmp_path_factory, name))
    assert report.unlearn.unchanged == len(before) - len(report.unlearn.changed)
