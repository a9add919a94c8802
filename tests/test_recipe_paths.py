"""What subspace writes for later use (recipe.yaml, pipeline.yaml, adapter_config.json) holds
absolute local paths, so it works from any directory; references that are not local paths
(builtin:NAME, self, hub ids) are kept as written. Runs use relative paths from one directory and
re-run from another."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from cli_runner import run_cli as cli
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.merge_config import MergeConfig
from tiny_models import write_text

TINY_COMPRESS = ["--calib-samples", 4, "--calib-seqlen", 32, "--eval-seqlen", 64, "--eval-chars", 2000]


@pytest.fixture()
def here(tiny_llama, tmp_path):
    """A working directory holding a model and a text file, named relatively from inside it."""
    here = tmp_path / "here"
    shutil.copytree(tiny_llama, here / "model")
    write_text(here / "calib.txt")
    (tmp_path / "elsewhere").mkdir()
    return here


def test_absolute_config_keeps_builtins_self_and_hub_ids(tmp_path, monkeypatch):
    from subspace_cli.pipelines.config_paths import absolute_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()  # an existing directory wins over the hub-id reading, as when loading
    values = CompressConfig(model="org/local", out="o", calib=["builtin:kjv,a.txt", "self", "~/c.txt"],
                            eval=["d/e.txt"]).model_dump(mode="json")
    got = absolute_config(CompressConfig, values)
    assert got["model"] == str(tmp_path / "org" / "local") and got["out"] == str(tmp_path / "o")
    assert got["calib"] == ["builtin:kjv", str(tmp_path / "a.txt"), "self", os.path.expanduser("~/c.txt")]
    assert got["eval"] == [str(tmp_path / "d" / "e.txt")] and got["ratio"] == values["ratio"]
    hub = absolute_config(CompressConfig, {**values, "model": "HuggingFaceTB/SmolLM2-135M"})
    assert hub["model"] == "HuggingFaceTB/SmolLM2-135M"  # not a local path: a hub id, kept
    for ref in ("./gpt2", "a/b/c"):  # what resolve_model_path reads as local paths
        assert absolute_config(CompressConfig, {**values, "model": ref})["model"] == os.path.abspath(ref)
    # A directory that a pipeline step is going to create is local before it exists.
    assert absolute_config(CompressConfig, {**values, "model": "w/c"}, ["w"])["model"] == str(tmp_path / "w" / "c")


def test_merge_eval_pairs_make_only_the_source_absolute(tmp_path, monkeypatch):
    from subspace_cli.pipelines.config_paths import absolute_config

    monkeypatch.chdir(tmp_path)
    values = MergeConfig(models=["a", "builtin:smollm2-135m"], base="b/c/d", out="m",
                         eval=["kjv=builtin:kjv", "mine=text.txt"], data=["x.txt"]).model_dump(mode="json")
    got = absolute_config(MergeConfig, values)
    assert got["eval"] == ["kjv=builtin:kjv", f"mine={tmp_path / 'text.txt'}"]
    assert got["models"] == ["a", "builtin:smollm2-135m"]  # 'a' names no local path: a hub id
    assert got["base"] == str(tmp_path / "b" / "c" / "d") and got["data"] == [str(tmp_path / "x.txt")]


def test_compress_recipe_reruns_from_another_directory(here):
    proc = cli("compress", "model", "--out", "out", "--calib", "calib.txt", *TINY_COMPRESS, "--json", cwd=here)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((here / "out" / "recipe.yaml").read_text())["config"]
    assert (config["model"], config["out"], config["calib"]) == (str(here / "model"), str(here / "out"),
                                                                [str(here / "calib.txt")])
    elsewhere = here.parent / "elsewhere"
    proc = cli("run", here / "out" / "recipe.yaml", "--set", "out=again", "--json", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    # --set values keep the shell's meaning: relative to the directory the command runs in.
    assert (elsewhere / "again" / "model.safetensors").read_bytes() == (here / "out" / "model.safetensors").read_bytes()
    again = yaml.safe_load((elsewhere / "again" / "recipe.yaml").read_text())["config"]
    assert again["out"] == str(elsewhere / "again")


def test_adapter_names_its_base_absolutely_and_loads_from_another_directory(here, monkeypatch):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    proc = cli("adapt", "model", "--data", "calib.txt", "--out", "adapter", "--rank", 2, "--steps", 2, "--seqlen", 32,
               "--warmup-steps", 1, "--eval-every", 0, "--json", cwd=here)
    assert proc.returncode == 0, proc.stderr
    adapter = here / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str(here / "model") and "renamed" not in proc.stderr  # PEFT warns when names disagree
    config = yaml.safe_load((adapter / "recipe.yaml").read_text())["config"]
    assert (config["model"], config["data"], config["out"]) == (base_path, [str(here / "calib.txt")], str(adapter))

    monkeypatch.chdir(here.parent / "elsewhere")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        # AutoPeftModel loads the base named by base_model_name_or_path.
        auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        manual = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
        assert torch.equal(auto(input_ids=ids).logits, manual(input_ids=ids).logits)


def test_pipeline_yaml_holds_absolute_paths_even_for_outputs_not_made_yet(here, monkeypatch):
    """pipeline.yaml is written after each step, when later steps' inputs (`c2`, which reads like a
    hub id) do not exist yet: they are still local, being an earlier step's output."""
    from subspace_cli.pipelines.pipeline_run import run_recipe
    from subspace_cli.pipelines.recipes import load_recipe

    # c1 dense: compress refuses an already factored checkpoint.
    compress = {"calib": "calib.txt", "calib_samples": 4, "calib_seqlen": 32, "skip_eval": True, "format": "dense"}
    recipe = here / "p.yaml"
    recipe.write_text(yaml.safe_dump({
        "vars": {"model": "model"},
        "steps": [
            {"name": "c1", "verb": "compress", "config": {"model": "${model}", "out": "c1", **compress}},
            {"name": "c2", "verb": "compress", "config": {"model": "${c1.out}", "out": "c2", **compress}},
            {"name": "gate", "verb": "eval", "config": {"model": "${c2.out}", "baseline": "${model}",
                                                        "data": "calib.txt", "eval_seqlen": 32, "eval_chars": 1000}},
        ]}))
    monkeypatch.chdir(here)
    run_recipe(Path("p.yaml"), [])
    text = (here / "c1" / "pipeline.yaml").read_text()
    assert f"resolved from {here / 'p.yaml'}" in text and f"subspace run {here / 'c1' / 'pipeline.yaml'}" in text
    steps = yaml.safe_load(text)["steps"]
    gate = steps[2]["config"]
    assert (gate["model"], gate["baseline"], gate["data"]) == (str(here / "c2"), str(here / "model"),
                                                               str(here / "calib.txt"))
    assert steps[1]["config"]["model"] == str(here / "c1") and steps[0]["config"]["calib"] == [str(here / "calib.txt")]

    monkeypatch.chdir(here.parent / "elsewhere")  # the resolved pipeline re-plans from anywhere
    plan = load_recipe(here / "c2" / "pipeline.yaml", ["c1.out=again1", "c2.out=again2"])
    assert [s.config.model for s in plan.steps] == [str(here / "model"), str(here / "c1"), str(here / "c2")]
