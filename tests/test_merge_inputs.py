"""What `subspace merge` accepts as input, checked before anything is written: LoRA adapters only on the
base they were trained on, inputs' config.json, pickle weights behind --allow-pickle, finite weights and
tensors, and --data / --eval errors in merge's own flags. Tiny Llamas built on the fly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli_runner import run_cli as cli
from subspace_cli.errors import UsageError
from tiny_models import make_lora_adapter, make_tiny_llama, perturbed_copy, write_text

UP = "model.layers.0.mlp.up_proj.weight"


def run(**values):
    """The merge verb in-process, with the CLI's validation (flags named in errors)."""
    from subspace_cli.cli.options import config_from_cli
    from subspace_cli.pipelines.merge import run_merge
    from subspace_cli.pipelines.merge_config import MergeConfig

    return run_merge(config_from_cli(MergeConfig, {"method": "task-arithmetic", **values}))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    make_lora_adapter(base, out, seed)
    return out


def set_trained_on(adapter: Path, ref: str) -> None:
    file = adapter / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg["base_model_name_or_path"] = ref
    file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    """base (the session tiny Llama, never modified), a copy of it elsewhere, another base of the same
    shape, two fine-tunes, and adapters trained on each base."""
    root = tmp_path_factory.mktemp("inputs")
    copy = Path(shutil.copytree(tiny_llama, root / "base-copy"))
    other = make_tiny_llama(root / "other-base", seed=1)
    return {
        "base": tiny_llama, "copy": copy, "other": other,
        "a": perturbed_copy(tiny_llama, root / "a", 1), "b": perturbed_copy(tiny_llama, root / "b", 2),
        "on_base": make_adapter(tiny_llama, root / "on-base", 3),
        "on_copy": make_adapter(copy, root / "on-copy", 4),
        "on_other": make_adapter(other, root / "on-other", 5),
    }


def clone(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ----------------------------------------------------------------------------- 1. LoRA adapters and their base


def test_adapter_trained_on_another_base_of_the_same_shape_exits_2_and_force_base_merges(tmp_path, world):
    out = tmp_path / "out"
    proc = cli("merge", world["on_other"], world["a"], "--base", world["base"], "--out", out, "--quiet")
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr
    for part in (str(world["on_other"]), str(world["other"]), str(world["base"]), "--force-base", "--base"):
        assert part in message, (part, message)
    assert not out.exists()

    proc = cli("merge", world["on_other"], world["a"], "--base", world["base"], "--out", out, "--quiet", "--force-base",
               "--json")
    assert proc.returncode == 0, proc.stderr
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("--force-base" in n and str(world["other"]) in n for n in notes), notes
    assert yaml.safe_load((out / "recipe.yaml").read_text())["config"]["force_base"] is True


def test_adapter_on_the_same_base_or_a_bitwise_copy_merges(tmp_path, world):
    report = run(models=[str(world["on_base"]), str(world["on_copy"])], base=str(world["base"]), out=str(tmp_path / "o"))
    assert not report.notes


def test_adapter_base_given_as_a_relative_path(tmp_path, world, monkeypatch):
    monkeypatch.chdir(world["other"].parent)
    same, other = clone(world["on_base"], tmp_path / "same"), clone(world["on_base"], tmp_path / "other")
    set_trained_on(same, world["copy"].name)  # relative to the working directory: a copy of --base
    set_trained_on(other, world["other"].name)  # relative: another model of the same shape
    run(models=[str(same), str(world["a"])], base=str(world["base"]), out=str(tmp_path / "ok"))
    with pytest.raises(UsageError, match=rf"adapter '{other}' was trained on 'other-base' \({world['other']}\), not on --base "
                                         rf"'{world['base']}': tensor '{UP}' differs.*--force-base"):
        run(models=[str(other), str(world["a"])], base=str(world["base"]), out=str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()


def test_adapter_base_that_is_not_available_locally_is_noted_not_refused(tmp_path, world, caplog):
    uncached = clone(world["on_base"], tmp_path / "uncached")
    set_trained_on(uncached, "nobody-here/not-a-cached-model")
    report = run(models=[str(uncached), str(world["a"])], base=str(world["base"]), out=str(tmp_path / "o"))
    assert any("nobody-here/not-a-cached-model" in n and "not available locally" in n for n in report.notes)
    assert "not available locally" in caplog.text


def test_force_base_in_our_merge_yaml(tmp_path, world):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": str(world["base"]), "models": [str(world["on_other"]), str(world["a"])],
                                    "method": "task-arithmetic", "force_base": True}))
    from subspace_cli.pipelines.merge_yaml import read_merge_file

    values = read_merge_file(path)
    assert values["force_base"] is True
    report = run(**values, out=str(tmp_path / "o"))
    assert any("--force-base" in n for n in report.notes)


# ----------------------------------------------------------------------------- 2. config.json and the tokenizer


def _break(case: str, world, tmp_path: Path) -> tuple[dict, str]:
    """A merge whose inputs are broken as `case` says, and a fragment of the expected message."""
    a = clone(world["a"], tmp_path / "broken-a")
    base = str(world["base"])
    config = json.loads((a / "config.json").read_text())
    if case == "invalid json":
        (a / "config.json").write_text("{not json")
        return {"models": [str(a), str(world["b"])], "base": base}, f"'{a / 'config.json'}'.*not valid JSON"
    if case == "json list":
        (a / "config.json").write_text(json.dumps([config]))
        return {"models": [str(a), str(world["b"])], "base": base}, f"'{a / 'config.json'}'.*JSON list, not an object"
    if case == "model_type":
        (a / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
        return {"models": [str(a), str(world["b"])], "base": base}, "'mistral'.*the base.*'llama'"
    if case == "quantized":
        (a / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
        return {"models": [str(a), str(world["b"])], "base": base}, "quantized.*gptq"
    if case == "base without tokenizer":
        bare = clone(world["base"], tmp_path / "bare-base")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (bare / name).unlink(missing_ok=True)
        return {"models": [str(world["a"]), str(world["b"])], "base": str(bare)}, \
            "no tokenizer files.*tokenizer.json, vocab.json, vocab.txt, tokenizer.model"
    if case == "first model without tokenizer":
        (a / "tokenizer.json").unlink()
        return {"models": [str(a), str(world["b"])], "method": "linear"}, f"model '{a}' has no tokenizer files"
    if case == "base config list":
        listed = clone(world["base"], tmp_path / "listed-base")
        (listed / "config.json").write_text("[]")
        return {"models": [str(world["a"]), str(world["b"])], "base": str(listed)}, "JSON list, not an object"
    if case == "adapter config list":
        adapter = clone(world["on_base"], tmp_path / "listed-adapter")
        (adapter / "adapter_config.json").write_text("[]")
        return {"models": [str(adapter), str(world["b"])], "base": base}, "is not a JSON object"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["invalid json", "json list", "model_type", "quantized", "base without tokenizer",
                                  "first model without tokenizer", "base config list", "adapter config list"])
def test_bad_input_configs_exit_2_before_writing(tmp_path, world, case):
    values, message = _break(case, world, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=message):
        run(**values, out=str(out))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_quantized_input_exits_2_from_the_cli(tmp_path, world):
    values, _ = _break("quantized", world, tmp_path)
    proc = cli("merge", *values["models"], "--base", values["base"], "--out", tmp_path / "out")
    assert proc.returncode == 2 and "quantized" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. pickle weights


def _pickled(src: Path, dst: Path, shards: int = 1) -> Path:
    """A copy of `src` whose weights are only pickle: pytorch_model.bin, or shards with their index."""
    dst = clone(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, dst / file)
        weight_map.update(dict.fromkeys(part, file))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_pickle_only_inputs_need_allow_pickle_and_merge_like_their_safetensors_twins(tmp_path, world):
    a = _pickled(world["a"], tmp_path / "a-pickle")
    base = _pickled(world["base"], tmp_path / "base-pickle", shards=2)
    args = ["merge", a, world["b"], "--base", base, "--method", "ties", "--density", "0.5", "--quiet"]
    refused = cli(*args, "--out", tmp_path / "refused")
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()

    proc = cli(*args, "--out", tmp_path / "pickled", "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    twin = cli("merge", world["a"], world["b"], "--base", world["base"], "--method", "ties", "--density", "0.5",
               "--quiet", "--out", tmp_path / "twin")
    assert twin.returncode == 0, twin.stderr
    got, want = tensors(tmp_path / "pickled"), tensors(tmp_path / "twin")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_pickle_adapter_needs_allow_pickle_and_merges_like_its_twin(tmp_path, world):
    adapter = clone(world["on_base"], tmp_path / "adapter-pickle")
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match="adapter_model.bin.*--allow-pickle"):
        run(models=[str(adapter), str(world["a"])], base=str(world["base"]), out=str(tmp_path / "no"))
    run(models=[str(adapter), str(world["a"])], base=str(world["base"]), out=str(tmp_path / "p"), allow_pickle=True)
    run(models=[str(world["on_base"]), str(world["a"])], base=str(world["base"]), out=str(tmp_path / "s"))
    got, want = tensors(tmp_path / "p"), tensors(tmp_path / "s")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- 4. finite numbers


def test_weights_inf_exits_2_naming_the_flag(tmp_path, world):
    proc = cli("merge", world["a"], world["b"], "--base", world["base"], "--weights", "1,inf", "--out", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr
    assert "--weights '1,inf'" in proc.stderr and "finite" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("values, message", [
    ({"weights": "nan"}, "--weights 'nan'.*finite"),
    ({"weights": "-inf,1"}, "--weights '-inf,1'.*finite"),
    ({"density": "nan", "method": "ties"}, "--density 'nan'.*finite"),
    ({"density": "0.5,inf", "method": "ties"}, "--density '0.5,inf'.*finite"),
    ({"options": {"lambda": float("inf")}}, "lambda.*finite"),
    ({"options": {"alpha": float("nan")}, "method": "tsv"}, "alpha.*finite"),
    ({"options": {"fraction": float("nan")}, "method": "tsv"}, "fraction.*finite"),
    ({"options": {"common_fraction": float("nan")}, "method": "iso-cts"}, "common_fraction.*finite"),
])
def test_non_finite_numbers_exit_2(tmp_path, world, values, message):
    with pytest.raises(UsageError, match=message):
        run(models=[str(world["a"]), str(world["b"])], base=str(world["base"]), out=str(tmp_path / "o"), **values)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 5. --data and --eval messages


def _no_calibration_words(message: str) -> None:
    assert "calibration" not in message and "--calib" not in message, message


@pytest.mark.parametrize("case", ["missing --data", "short --data", "missing --eval", "empty --eval held-out"])
def test_data_errors_speak_merge_flags(tmp_path, world, case):
    text, short = write_text(tmp_path / "text.txt"), write_text(tmp_path / "short.txt", "too short")
    pair = [str(world["a"]), str(world["b"])]
    concrete = {"method": "concrete", "samples": 2, "seqlen": 16, "options": {"steps": 1}}
    values, message = {
        "missing --data": ({**concrete, "data": [str(tmp_path / "nope.txt"), str(text)]}, r"--data '.*nope.txt'.*does not exist"),
        "short --data": ({**concrete, "data": [str(short), str(text)]}, r"--data '.*short.txt' has 9 tokens.*--seqlen 16"),
        "missing --eval": ({"eval": [f"t={tmp_path / 'nope.txt'}"]}, r"--eval '.*nope.txt' does not exist"),
        "empty --eval held-out": ({"eval": [f"t={short}"]},
                                  r"held-out 5% of --eval 't=.*short.txt' has 0 token\(s\); scoring needs at least 2"),
    }[case]
    with pytest.raises(UsageError, match=message) as caught:
        run(models=pair, base=str(world["base"]), out=str(tmp_path / "o"), **values)
    _no_calibration_words(str(caught.value))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 6. non-finite input tensors


@pytest.mark.parametrize("where", ["a", "base"])
def test_non_finite_input_tensor_exits_2_naming_model_and_tensor(tmp_path, world, where):
    broken = clone(world[where], tmp_path / f"nan-{where}")
    state = load_file(broken / "model.safetensors")
    state[UP][0, 0] = float("nan") if where == "a" else float("inf")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    models = [str(broken if where == "a" else world["a"]), str(world["b"])]
    base = str(broken if where == "base" else world["base"])
    out = tmp_path / "out"
    proc = cli("merge", *models, "--base", base, "--out", out, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert f"model '{broken}'" in proc.stderr and UP in proc.stderr and "non-finite" in proc.stderr
    assert not out.exists()
