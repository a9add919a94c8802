"""The merge verb on tiny Llamas built on the fly: identities hold exactly, mergekit 0.1.5 gives the
same tensors, LoRA inputs equal their merged models, output shards load, bad input exits 2."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_runner import run_cli as cli
from tiny_models import make_char_tokenizer, make_lora_adapter, make_tiny_llama


def _perturbed(base: Path, out: Path, seed: int, scale: float = 0.05, vocab: int | None = None) -> Path:
    """A 'fine-tuned' copy of base: every tensor plus seeded noise (optionally a resized vocabulary)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(out)
    make_char_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, two fine-tunes of it, and a copy of the first fine-tune."""
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_llama(root / "base")
    return {"base": base, "a": _perturbed(base, root / "a", 1), "b": _perturbed(base, root / "b", 2)}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def merge(tmp_path, family, *args, name="out"):
    out = tmp_path / name
    proc = cli("merge", family["a"], family["b"], "--base", family["base"], "--out", out, "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    return out


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("method, option", [
    ("task-arithmetic", "lambda=0"), ("ties", "lambda=0"), ("dare-linear", "lambda=0"), ("dare-ties", "lambda=0"),
    ("tsv", "alpha=0"), ("iso-c", "alpha=0"), ("iso-cts", "alpha=0"),
])
def test_zero_scale_gives_the_base_bitwise(tmp_path, family, method, option):
    out = merge(tmp_path, family, "--method", method, "-O", option, "--density", "0.5")
    merged, base = tensors(out), tensors(family["base"])
    assert merged.keys() == base.keys()
    for key in base:
        assert torch.equal(merged[key], base[key]), key


@pytest.mark.parametrize("method, args", [
    ("linear", []), ("task-arithmetic", ["-O", "normalize=true"]), ("ties", []),
])
def test_merging_identical_models_gives_that_model(tmp_path, family, method, args):
    out = tmp_path / "out"
    proc = cli("merge", family["a"], family["a"], "--base", family["base"], "--method", method, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    merged, model = tensors(out), tensors(family["a"])
    for key in model:
        # fp32 rounding of base + (a − base) only.
        assert (merged[key] - model[key]).abs().max() <= 1e-6, key


# ----------------------------------------------------------------------------- mergekit parity


MERGEKIT_CASES = {
    "linear": {"parameters": {}, "weights": [(0.7, None), (0.4, None)], "base": False},
    "task_arithmetic": {"parameters": {"lambda": 0.8}, "weights": [(0.7, None), (0.4, None)], "base": True},
    "ties": {"parameters": {"normalize": True, "lambda": 0.9}, "weights": [(0.7, 0.5), (0.4, 0.3)], "base": True},
}


def _mergekit_yaml(family, method: str) -> dict:
    case = MERGEKIT_CASES[method]
    models = []
    for (weight, density), name in zip(case["weights"], ("a", "b")):
        params = {"weight": weight} | ({"density": density} if density is not None else {})
        models.append({"model": str(family[name]), "parameters": params})
    config = {"merge_method": method, "models": models, "parameters": case["parameters"], "dtype": "float32"}
    if case["base"]:
        config["base_model"] = str(family["base"])
    return config


@pytest.mark.parametrize("method", sorted(MERGEKIT_CASES))
def test_same_tensors_as_mergekit(tmp_path, family, method):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = _mergekit_yaml(family, method)
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    proc = cli("merge", path, "--out", tmp_path / "ours", "--quiet")  # the same YAML file
    assert proc.returncode == 0, proc.stderr
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    assert worst <= 1e-6, f"{method}: max |ours − mergekit| = {worst:.2e}"


# ----------------------------------------------------------------------------- inputs and outputs


def test_lora_adapters_merge_like_their_merged_models(tmp_path, family):
    """Two PEFT LoRA adapters on the base give the same merge as the two merged full models."""
    adapters, full = [], []
    for seed in (3, 4):
        model = make_lora_adapter(family["base"], tmp_path / f"adapter{seed}", seed)
        model.merge_and_unload().save_pretrained(tmp_path / f"full{seed}")
        make_char_tokenizer().save_pretrained(tmp_path / f"full{seed}")
        adapters.append(tmp_path / f"adapter{seed}")
        full.append(tmp_path / f"full{seed}")
    common = ["--base", family["base"], "--method", "ties", "--density", "0.5", "--quiet"]
    assert cli("merge", *adapters, "--out", tmp_path / "from_adapters", *common).returncode == 0
    assert cli("merge", *full, "--out", tmp_path / "from_full", *common).returncode == 0
    a, b = tensors(tmp_path / "from_adapters"), tensors(tmp_path / "from_full")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_sharded_output_loads_and_report_has_statistics(tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = merge(tmp_path, family, "--method", "ties", "--density", "0.5", "--shard-size", "20KB", "--dtype", "bfloat16")
    assert len(list(out.glob("model-*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file()  # the base's tokenizer travels with the merge
    report = json.loads((out / "report.json").read_text())
    rows = {t["name"]: t for t in report["merge"]["tensors"]}
    up = rows["model.layers.0.mlp.up_proj.weight"]
    # Each input keeps half of its entries by magnitude, independently: about a quarter is kept by
    # neither and stays zero (measured 0.257). Independent noise disagrees in sign about half the time.
    assert 0.2 <= up["sparsity"] <= 0.35 and 0.3 < up["sign_conflict"] < 0.7
    assert yaml.safe_load((out / "recipe.yaml").read_text())["verb"] == "merge"


def test_dare_is_deterministic_for_a_seed(tmp_path, family):
    first = tensors(merge(tmp_path, family, "--method", "dare-ties", "--density", "0.3", name="one"))
    second = tensors(merge(tmp_path, family, "--method", "dare-ties", "--density", "0.3", name="two"))
    third = tensors(merge(tmp_path, family, "--method", "dare-ties", "--density", "0.3", "--seed", "1", name="three"))
    key = "model.layers.1.self_attn.q_proj.weight"
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first[key], third[key])


def test_eval_scores_every_model_and_normalises_to_specialists(tmp_path, family):
    text = tmp_path / "task.txt"
    text.write_text((Path(__file__).parent / "tiny_models.py").read_text() * 3)
    out = tmp_path / "out"
    proc = cli("merge", family["a"], family["b"], "--base", family["base"], "--out", out, "--json",
               "--eval", f"one={text}", "--eval", f"two={text}", "--eval-seqlen", 32, "--eval-chars", 2000)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    merge_report = summary["merge"]
    assert set(merge_report["perplexity"]["one"]) == {"merged", "base", str(family["a"]), str(family["b"])}
    assert merge_report["specialists"] == {"one": str(family["a"]), "two": str(family["b"])}
    ppl = merge_report["perplexity"]
    expected = (ppl["one"]["merged"] / ppl["one"][str(family["a"])] + ppl["two"]["merged"] / ppl["two"][str(family["b"])]) / 2
    assert merge_report["normalised"]["merged"] == pytest.approx(expected, rel=1e-9)
    assert "tensors" not in merge_report  # the per-tensor table stays in report.json


def test_concrete_trains_a_mask_and_plots_its_density(tmp_path, family):
    text = tmp_path / "task.txt"
    text.write_text((Path(__file__).parent / "tiny_models.py").read_text() * 3)
    out = merge(tmp_path, family, "--method", "concrete", "--data", text, "--data", text, "--samples", 4,
                "--seqlen", 16, "-O", "steps=3", "-O", "batch_size=2")
    report = json.loads((out / "report.json").read_text())
    densities = [t["mask_density"] for t in report["merge"]["tensors"] if t["mask_density"] is not None]
    assert densities and all(0.0 <= d <= 1.0 for d in densities)
    assert len(report["merge"]["mask_losses"]) == 3
    assert (out / "mask_density.png").stat().st_size > 0


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def misfits(tmp_path_factory, family):
    root = tmp_path_factory.mktemp("misfits")
    resized = _perturbed(family["base"], root / "resized", 5, vocab=130)
    reordered = _perturbed(family["base"], root / "reordered", 6)
    tokenizer = json.loads((reordered / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, two ids swapped
    (reordered / "tokenizer.json").write_text(json.dumps(tokenizer))
    return {"resized": resized, "reordered": reordered}


@pytest.mark.parametrize("case, message", [
    ("shape", "model.embed_tokens.weight"),
    ("vocabulary", "different vocabulary"),
    ("no base", "needs the base model"),
    ("density 0", "outside (0, 1]"),
    ("density 1.5", "outside (0, 1]"),
    ("one model", "at least two models"),
    ("method", "valid:"),
    ("weights", "one value or one per model"),
    ("option", "valid options"),
    ("mergekit method", "has no counterpart"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, family, misfits, case, message):
    a, b, base = family["a"], family["b"], family["base"]
    out = tmp_path / "out"
    mergekit_file = tmp_path / "mk.yaml"
    mergekit_file.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(base),
                                             "models": [{"model": str(a)}, {"model": str(b)}]}))
    args = {
        "shape": [a, misfits["resized"], "--base", base],
        "vocabulary": [a, misfits["reordered"], "--base", base],
        "no base": [a, b, "--method", "ties"],
        "density 0": [a, b, "--base", base, "--method", "ties", "--density", "0"],
        "density 1.5": [a, b, "--base", base, "--method", "ties", "--density", "0.5,1.5"],
        "one model": [a, "--base", base],
        "method": [a, b, "--base", base, "--method", "nope"],
        "weights": [a, b, "--base", base, "--weights", "1,2,3"],
        "option": [a, b, "--base", base, "-O", "bogus=1"],
        "mergekit method": [mergekit_file],
    }[case]
    proc = cli("merge", *args, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out.exists()
