"""`subspace run` pipelines and `subspace schema`: references, vars and --set, validation before
anything runs (exit 2), gates that stop a pipeline (exit 1), and every recipe in recipes/ run on
tiny models built on the fly."""

import json
import re
from pathlib import Path

import pytest
import yaml

from cli_runner import run_cli as cli
from subspace_cli.errors import UsageError
from subspace_cli.pipelines.recipes import load_recipe
from tiny_models import perturbed_copy, write_text

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PIPELINE = RECIPES / "pipeline-smollm2-merge-compress-gate.yaml"
RETAIN_TEXT = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n" * 40


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _three_steps() -> dict:
    """adapt -> compress -> eval with vars, typed references and a step reference; nothing on disk."""
    return {
        "vars": {"model": "no/such/model", "work": "w", "n": 3, "sources": ["a.txt", "b.txt"]},
        "steps": [
            {"name": "first", "verb": "adapt",
             "config": {"model": "${model}", "data": "${sources}", "steps": "${n}", "out": "${work}/first", "merge": True}},
            {"name": "second", "verb": "compress",
             "config": {"model": "${first.out}/merged", "out": "${work}/second", "calib_samples": "${first.steps}"}},
            {"name": "gate", "verb": "eval", "config": {"model": "${second.out}", "data": "x.txt", "fail_if": "ppl>1"}},
        ],
    }


# ----------------------------------------------------------------------------- resolution


def test_vars_step_references_and_set_overrides(tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", _three_steps())
    plan = load_recipe(recipe, ["work=/data/run", "n=5", "second.ratio=0.3", "gate.eval-chars=1000"])
    first, second, gate = plan.steps
    assert [s.name for s in plan.steps] == ["first", "second", "gate"]
    assert first.config.out == "/data/run/first"  # --set work overrides the var inside longer text
    assert first.config.steps == 5 and isinstance(first.config.steps, int)  # a whole-value reference keeps its type
    assert first.config.data == ["a.txt", "b.txt"]
    assert second.config.model == "/data/run/first/merged"  # ${first.out}: the earlier step's resolved out
    assert second.config.calib_samples == 5  # ${first.steps} after first's own substitution
    assert second.config.ratio == 0.3 and gate.config.eval_chars == 1000  # STEP.FIELD overrides one field
    assert gate.config.model == "/data/run/second" and gate.config.fail_if == ["ppl>1"]
    assert plan.vars == {"model": "no/such/model", "work": "/data/run", "n": 5, "sources": ["a.txt", "b.txt"]}


def test_single_step_recipes_keep_set_as_a_field_override(tmp_path):
    recipe = RECIPES / "compress-smollm2-svd-llm.yaml"
    plan = load_recipe(recipe, ["ratio=0.3", "out=elsewhere"])
    assert not plan.pipeline and plan.steps[0].config.ratio == 0.3 and plan.steps[0].config.out == "elsewhere"
    with pytest.raises(UsageError, match=r"unknown field 'ration' \(did you mean 'ratio'\?\)"):
        load_recipe(recipe, ["ration=0.3"])


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    """The model does not exist: any attempt to load it would exit 2, so exit 0 means nothing loaded."""
    recipe = write_recipe(tmp_path / "p.yaml", _three_steps())
    proc = cli("run", recipe, "--dry-run", "--json", "--set", "n=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["ok"] and plan["dry_run"]
    assert [(s["name"], s["verb"]) for s in plan["steps"]] == [("first", "adapt"), ("second", "compress"), ("gate", "eval")]
    assert plan["steps"][0]["config"]["steps"] == 4 and plan["steps"][0]["config"]["lr"] is None  # defaults filled in
    assert plan["steps"][1]["config"]["model"] == "w/first/merged"
    assert list(tmp_path.iterdir()) == [recipe]  # no output directory was created
    text = cli("run", recipe, "--dry-run", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert yaml.safe_load(text.stdout)["steps"][2]["config"]["model"] == "w/second"


# ----------------------------------------------------------------------------- exit 2 before anything runs


def test_typo_in_a_step_field_exits_2_naming_field_step_and_choices(tmp_path):
    data = _three_steps()
    data["steps"][0]["config"]["stepz"] = data["steps"][0]["config"].pop("steps")
    proc = cli("run", write_recipe(tmp_path / "p.yaml", data), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "step 'first' (adapt)" in line and "'stepz'" in line and "did you mean 'steps'?" in line
    assert re.search(r"valid: .*\bmodel\b.*\brank\b.*\bsteps\b", line)


@pytest.mark.parametrize("edit, overrides, needles", [
    (lambda d: d["steps"][1].update(verb="compres"), [], ["step 2", "unknown verb 'compres'", "did you mean 'compress'?"]),
    (lambda d: d.update(stages=d.pop("steps")), [], ["neither 'verb'", "'steps'"]),
    (lambda d: d.update(var=d.pop("vars")), [], ["unknown top-level key 'var'", "did you mean 'vars'?", "valid: vars, steps"]),
    (lambda d: d["steps"][0].update(confg=d["steps"][0].pop("config")), [], ["step 1", "unknown step key 'confg'", "did you mean 'config'?"]),
    (lambda d: d["steps"][2].update(name="first"), [], ["steps 1 and 3 are both named 'first'"]),
    (lambda d: None, ["second.ration=0.3"], ["step 'second' (compress)", "'ration'", "did you mean 'ratio'?"]),
    (lambda d: None, ["secnd.ratio=0.3"], ["unknown step 'secnd'", "did you mean 'second'?"]),
    (lambda d: None, ["modle=x"], ["unknown var 'modle'", "did you mean 'model'?", "model, work, n, sources"]),
    (lambda d: None, ["n=three"], ["step 'first' (adapt): field 'steps'", "got 'three'", "integer"]),
    (lambda d: None, ["second.method=svd-lm"], ["step 'second' (compress)", "'svd-lm' is not a compress method"]),
    (lambda d: None, ["gate.fail_if=[bogus>1]"], ["step 'gate' (eval)", "unknown field 'bogus'"]),
])
def test_bad_recipe_exits_2_before_anything_runs(tmp_path, edit, overrides, needles):
    from subspace_cli.pipelines.pipeline_run import check_steps

    data = _three_steps()
    edit(data)
    recipe = write_recipe(tmp_path / "p.yaml", data)
    with pytest.raises(UsageError) as info:
        check_steps(load_recipe(recipe, overrides))  # what `run` does before the first step
    assert info.value.exit_code == 2
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_unknown_step_reference_exits_2_listing_the_earlier_steps(tmp_path):
    data = _three_steps()
    data["steps"][2]["config"]["model"] = "${secnod.out}"
    proc = cli("run", write_recipe(tmp_path / "p.yaml", data), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "step 'gate' (eval) config.model" in line and "unknown step 'secnod'" in line
    assert "did you mean 'second'?" in line and "steps before this one: first, second" in line


@pytest.mark.parametrize("step, field, value, needles", [
    (1, "model", "${gate.out}", ["refers to step 'gate', which runs later", "steps before it: first"]),
    (1, "model", "${second.out}", ["refers to its own step 'second'"]),
    (1, "model", "${first.outt}", ["step 'first' (adapt) has no field 'outt'", "did you mean 'out'?"]),
    (0, "out", "${wrok}/first", ["config.out", "unknown var 'wrok'", "did you mean 'work'?", "defined vars: model, work"]),
    (1, "model", "${first}", ["unknown var 'first'", "write ${first.out}"]),
    (0, "out", "${a.b.c}", ["is not a reference"]),
    (0, "out", "${work/first", ["unterminated"]),
    (0, "out", "${sources}/x", ["cannot be part of a longer string"]),
])
def test_bad_references_exit_2(tmp_path, step, field, value, needles):
    data = _three_steps()
    data["steps"][step]["config"][field] = value
    with pytest.raises(UsageError) as info:
        load_recipe(write_recipe(tmp_path / "p.yaml", data), [])
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_two_steps_writing_one_directory_exit_2(tmp_path):
    data = _three_steps()
    data["steps"][1]["config"]["out"] = "${work}/first"
    with pytest.raises(UsageError, match="steps 'first' and 'second' both write 'w/first'"):
        load_recipe(write_recipe(tmp_path / "p.yaml", data), [])


def test_paths_an_earlier_step_creates_are_checked_when_it_has_run(tmp_path):
    """An inspect plot inside an earlier step's output cannot exist yet; anywhere else it must."""
    from subspace_cli.pipelines.pipeline_run import check_steps

    data = _three_steps()
    data["steps"].append({"name": "look", "verb": "inspect", "config": {"model": "${second.out}", "plot": "${second.out}/s.png"}})
    check_steps(load_recipe(write_recipe(tmp_path / "p.yaml", data), []))  # no error: 'second' makes that directory
    with pytest.raises(UsageError, match=r"step 'look' \(inspect\): --plot .*does not exist"):
        check_steps(load_recipe(write_recipe(tmp_path / "p.yaml", data), ["look.plot=nowhere/s.png"]))


def test_vars_may_use_vars(tmp_path):
    data = _three_steps()
    data["vars"].update(root="r", work="${root}/w")
    recipe = write_recipe(tmp_path / "p.yaml", data)
    plan = load_recipe(recipe, [])
    assert plan.steps[0].config.out == "r/w/first" and plan.vars["work"] == "r/w"
    assert load_recipe(recipe, ["root=/x"]).steps[0].config.out == "/x/w/first"  # --set reaches the vars built on it


@pytest.mark.parametrize("extra, overrides, needle", [
    ({"model": "${model}"}, [], "var 'model' refers to itself (model -> model)"),
    ({"model": "${work}/m", "work": "${model}"}, [], "var 'model' refers back to itself (model -> work -> model)"),
    ({}, ["work=${work}/again"], "var 'work' refers to itself (work -> work)"),
    ({"model": "${first.out}"}, [], "vars.model: '${first.out}' refers to a step; a var can use only other vars"),
])
def test_a_var_defined_through_itself_exits_2_naming_the_cycle(tmp_path, extra, overrides, needle):
    data = _three_steps()
    data["vars"].update(extra)
    proc = cli("run", write_recipe(tmp_path / "p.yaml", data), "--dry-run", *(f"--set={o}" for o in overrides),
               cwd=tmp_path)
    assert proc.returncode == 2 and needle in error_line(proc), proc.stderr


def test_a_wrong_type_in_a_recipe_names_the_field_and_step_not_a_flag(tmp_path):
    config = {"model": "m", "out": "o", "ratio": "abc"}
    write_recipe(tmp_path / "x.yaml", {"verb": "compress", "config": config})
    write_recipe(tmp_path / "p.yaml", {"steps": [{"name": "c", "verb": "compress", "config": config}]})
    for recipe, place in (("x.yaml", "recipe 'x.yaml' (compress)"), ("p.yaml", "recipe 'p.yaml' step 'c' (compress)")):
        proc = cli("run", recipe, "--dry-run", cwd=tmp_path)
        line = error_line(proc)
        assert proc.returncode == 2 and f"{place}: field 'ratio': Input should be a valid number" in line, line
        assert line.endswith("got 'abc'") and "--ratio" not in line
    proc = cli("compress", "m", "--out", "o", "--ratio", "1.5", cwd=tmp_path)  # the command line names its flag
    assert proc.returncode == 2 and "--ratio 1.5: Input should be less than 1" in error_line(proc)


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe\x00verb", "is not UTF-8 text (byte 0)"),
    (b"verb: compress\x00\x01", "is a binary file, not YAML text"),
    (b"", "is empty"),
    (b"# a comment only\n", "is empty"),
    (b"42\n", "holds a single value (int), not a mapping"),
    (b"- verb: compress\n", "holds a list, not a mapping"),
])
def test_a_recipe_that_is_not_a_yaml_mapping_exits_2(tmp_path, content, needle):
    (tmp_path / "x.yaml").write_bytes(content)
    proc = cli("run", "x.yaml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and f"recipe 'x.yaml' {needle}" in error_line(proc), proc.stderr
    assert "{verb, config} for one step or {vars, steps} for a pipeline" in error_line(proc)


@pytest.mark.parametrize("text, needle", [
    # YAML keeps the last of two equal keys silently; this recipe would have run as compress.
    ("verb: eval\nconfig: {model: m, data: x.txt}\nverb: compress\n", "the key 'verb' appears twice in one mapping"),
    ("vars: {a: &x [*x]}\nsteps: [{verb: eval, config: {model: m, data: x.txt}}]\n", "recursive node (line 1"),
])
def test_yaml_that_would_be_misread_exits_2(tmp_path, text, needle):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(UsageError, match=r"recipe '.*x.yaml' is not valid YAML: ") as info:
        load_recipe(tmp_path / "x.yaml", [])
    assert needle in str(info.value)


def test_run_on_a_directory_says_so_and_suggests_its_recipe(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match=r"recipe '.*out' is a directory; pass a recipe file"):
        load_recipe(tmp_path / "out", [])
    write_recipe(tmp_path / "out" / "recipe.yaml", {"verb": "eval", "config": {"model": "m", "data": "x.txt"}})
    proc = cli("run", "out", cwd=tmp_path)
    assert proc.returncode == 2 and "recipe 'out' is a directory; did you mean 'out/recipe.yaml'" in error_line(proc)


@pytest.mark.parametrize("form, sets, needle", [
    ("single", ["ratio=[1"], "--set 'ratio=[1': value is not valid YAML"),  # was exit 3, 'unexpected ParserError'
    ("single", ["ratio"], "--set 'ratio' is not KEY=VALUE; write FIELD=VALUE for a compress field"),
    ("single", ["method=svd-lm"], "recipe 'x.yaml' (compress): --method 'svd-lm' is not a compress method"),
    ("pipeline", ["n"], "--set 'n' is not KEY=VALUE; write NAME=VALUE for a var, or STEP.FIELD=VALUE"),
    ("pipeline", ["n=[3"], "--set 'n=[3': value is not valid YAML"),
])
def test_bad_set_values_and_single_step_checks_exit_2(tmp_path, form, sets, needle):
    """A single-step dry run runs the verb's own pre-load checks too, as a pipeline's does."""
    data = {"verb": "compress", "config": {"model": "m", "out": "o"}} if form == "single" else _three_steps()
    write_recipe(tmp_path / "x.yaml", data)
    proc = cli("run", "x.yaml", "--dry-run", *(f"--set={s}" for s in sets), cwd=tmp_path)
    assert proc.returncode == 2 and needle in error_line(proc), proc.stderr


# ----------------------------------------------------------------------------- running


@pytest.fixture()
def corpora(tmp_path):
    return write_text(tmp_path / "kjv.txt", RETAIN_TEXT), write_text(tmp_path / "shakespeare.txt")


def _tiny_pipeline_sets(tiny_llama, work, kjv, shakespeare) -> list[str]:
    """The shipped pipeline on a tiny Llama: vars for what every step shares, STEP.FIELD for the rest."""
    return [f"model={tiny_llama}", f"work={work}", "steps=2", "seqlen=32", f"kjv.data={kjv}",
            f"shakespeare.data={shakespeare}", "kjv.rank=2", "shakespeare.rank=2", f"compressed.calib={shakespeare}",
            "compressed.calib_samples=4", "compressed.calib_seqlen=32", f"gate.data={shakespeare}",
            "gate.eval_seqlen=64", "gate.eval_chars=2000",
            # A random tiny model scores ppl ≈ 128 (vocab 128), so the shipped 'ppl>60' gate would fail here.
            "gate.fail_if=[ppl_ratio>2.0, kl>1.0]"]


@pytest.mark.slow
def test_shipped_pipeline_runs_every_step_with_references(tiny_llama, corpora, tmp_path, monkeypatch):
    """adapt twice -> merge -> compress -> eval gate, on a tiny Llama. Each step's output holds its
    resolved single-step recipe.yaml and the resolved pipeline.yaml, both re-runnable."""
    from subspace_cli.pipelines.pipeline_run import run_recipe

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    sets = _tiny_pipeline_sets(tiny_llama, work, *corpora)
    plan = load_recipe(PIPELINE, sets).to_dict()["steps"]
    summary = json.loads(json.dumps(run_recipe(PIPELINE, sets).summary(), default=str))  # what --json prints
    assert summary["ok"] and [s["name"] for s in summary["steps"]] == ["kjv", "shakespeare", "merged", "compressed", "gate"]
    merged = next(s for s in plan if s["name"] == "merged")["config"]
    assert merged["models"] == [f"{work}/kjv/merged", f"{work}/shakespeare/merged"]  # ${kjv.out}/merged resolved
    gates = summary["steps"][-1]["summary"]["gates"]
    assert [(g["condition"], g["failed"]) for g in gates] == [("ppl_ratio>2.0", False), ("kl>1.0", False)]
    assert summary["steps"][3]["summary"]["params"]["targeted_ratio_removed"] >= 0.2 - 0.02  # measured 0.205
    for step in plan:
        if step["verb"] == "eval":
            continue
        out = Path(step["config"]["out"])
        assert yaml.safe_load((out / "recipe.yaml").read_text()) == {"verb": step["verb"], "config": step["config"]}
        assert yaml.safe_load((out / "pipeline.yaml").read_text())["steps"] == plan
    assert summary["pipeline_recipe"] == str(work / "compressed" / "pipeline.yaml")

    # The resolved pipeline re-plans to the same steps; a step's recipe.yaml re-runs that step exactly.
    assert load_recipe(work / "compressed" / "pipeline.yaml", []).to_dict()["steps"] == plan
    run_recipe(work / "merged" / "recipe.yaml", [f"out={tmp_path / 'merged-again'}"])
    assert (tmp_path / "merged-again" / "model.safetensors").read_bytes() == (work / "merged" / "model.safetensors").read_bytes()


def test_failed_gate_stops_the_pipeline_with_exit_1_and_lists_every_condition(tiny_llama, text_file, tmp_path, monkeypatch):
    """What CI sees: exit 1, and in the JSON every condition with its value and verdict; later steps never run."""
    recipe = write_recipe(tmp_path / "ci.yaml", {
        "vars": {"model": str(tiny_llama), "data": str(text_file)},
        "steps": [
            {"name": "small", "verb": "compress",
             "config": {"model": "${model}", "calib": "${data}", "calib_samples": 4, "calib_seqlen": 32, "skip_eval": True,
                        "ratio": 0.5, "out": "small"}},
            # ppl >= 1 and KL >= 0 always hold, so those two gates fail; a ratio is never negative, so that one passes.
            {"name": "gate", "verb": "eval",
             "config": {"model": "${small.out}", "baseline": "${model}", "data": "${data}", "eval_seqlen": 64,
                        "eval_chars": 2000, "fail_if": ["ppl>1", "ppl_ratio<0", "kl>=0"]}},
            {"name": "after", "verb": "compress", "config": {"model": "${small.out}", "calib": "${data}", "out": "after"}},
        ],
    })
    proc = cli("run", recipe, "--json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False and summary["exit_code"] == 1 and summary["failed_step"] == "gate"
    assert "step 'gate' (eval): quality gate failed: ppl>1" in summary["error"] and "kl>=0" in summary["error"]
    gates = {g["condition"]: g for g in summary["gates"]}
    assert list(gates) == ["ppl>1", "ppl_ratio<0", "kl>=0"]
    assert [g["failed"] for g in gates.values()] == [True, False, True]
    assert gates["ppl>1"]["value"] > 1 and gates["ppl_ratio<0"]["value"] > 0 and gates["kl>=0"]["value"] >= 0
    assert [g["condition"] for g in summary["failed"]] == ["ppl>1", "kl>=0"]
    assert [(s["name"], s["ok"]) for s in summary["steps"]] == [("small", True), ("gate", False)]
    assert summary["steps"][1]["summary"]["ppl"] == gates["ppl>1"]["value"]
    assert summary["pipeline_recipe"] == "small/pipeline.yaml" and (tmp_path / "small" / "pipeline.yaml").is_file()
    assert not (tmp_path / "after").exists()

    # For people (in-process, to spare a second interpreter start): the gate table, then the error line.
    from typer.testing import CliRunner

    from subspace_cli.cli.app import app

    monkeypatch.chdir(tmp_path)
    people = CliRunner().invoke(app, ["run", str(recipe), "--quiet", "--set", "gate.fail_if=[ppl>1]",
                                      "--set", "small.overwrite=true"])
    assert people.exit_code == 1, people.output
    assert "FAIL  fail-if ppl>1" in people.stdout and "step 'gate' (eval): quality gate failed" in people.stderr


# ----------------------------------------------------------------------------- every shipped recipe on tiny models

# recipes/ file -> the test that runs it on tiny models (adapt's lives beside the other adapt tests).
SHIPPED = {
    "adapt-smollm2-dora.yaml": "tests/test_adapt.py::test_shipped_adapt_recipe_validates_and_runs_on_a_tiny_model",
    "compress-smollm2-svd-llm.yaml": "test_shipped_compress_recipe_on_a_tiny_model",
    "merge-smollm2-ties.yaml": "test_shipped_merge_recipe_on_tiny_models",
    "unlearn-smollm2-rmu.yaml": "test_shipped_unlearn_recipe_on_a_tiny_model",
    "eval-smollm2-gate.yaml": "test_shipped_eval_recipe_on_a_tiny_model",
    "inspect-smollm2.yaml": "test_shipped_inspect_recipe_on_a_tiny_model",
    "pipeline-smollm2-merge-compress-gate.yaml": "test_shipped_pipeline_runs_every_step_with_references",
    "pipeline-smollm2-compress-heal-gate.yaml": "test_shipped_heal_pipeline_on_a_tiny_model",
}


def test_every_shipped_recipe_has_a_tiny_model_run_and_a_clean_dry_run(tmp_path, monkeypatch):
    from subspace_cli.pipelines.pipeline_run import run_recipe

    assert {p.name for p in RECIPES.glob("*.yaml")} == set(SHIPPED)
    monkeypatch.chdir(tmp_path)  # the recipes' relative outputs must not be checked against the repository
    for name, test in SHIPPED.items():
        assert test.startswith("tests/") or test in globals(), test
        plan = run_recipe(RECIPES / name, [], dry_run=True)  # on the real builtin:smollm2-135m, loading nothing
        assert plan["ok"], name


def _run_shipped(name, *sets):
    """In-process (the CLI path is covered above): what `subspace run NAME --set ... --json` prints."""
    from subspace_cli.pipelines.pipeline_run import run_recipe

    result = run_recipe(RECIPES / name, list(sets))
    return json.loads(json.dumps(result.summary() if hasattr(result, "summary") else result, default=str))


def test_shipped_compress_recipe_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    summary = _run_shipped("compress-smollm2-svd-llm.yaml", f"model={tiny_llama}", f"calib={text_file}", f"out={out}",
                           "calib_samples=8", "calib_seqlen=32", "eval_seqlen=64", "eval_chars=2000")
    assert summary["method"] == "svd-llm" and summary["params"]["targeted_ratio_removed"] >= 0.2 - 0.02
    assert yaml.safe_load((out / "recipe.yaml").read_text())["config"]["allocation"] == "global"


def test_shipped_merge_recipe_on_tiny_models(tiny_llama, text_file, tmp_path):
    a, b = perturbed_copy(tiny_llama, tmp_path / "a", 1), perturbed_copy(tiny_llama, tmp_path / "b", 2)
    out = tmp_path / "merged"
    summary = _run_shipped("merge-smollm2-ties.yaml", f"base={tiny_llama}", f"models={a},{b}", f"out={out}",
                           f"eval=text={text_file}", "eval_seqlen=32", "eval_chars=2000")
    merge = summary["merge"]
    assert summary["method"] == "ties" and merge["models"] == [str(a), str(b)] and merge["densities"] == [0.5, 0.5]
    assert set(merge["perplexity"]["text"]) >= {"merged", "base"}
    assert (out / "model.safetensors").is_file()


def test_shipped_unlearn_recipe_on_a_tiny_model(tiny_llama, tmp_path):
    forget, retain = write_text(tmp_path / "forget.txt"), write_text(tmp_path / "retain.txt", RETAIN_TEXT)
    summary = _run_shipped("unlearn-smollm2-rmu.yaml", f"model={tiny_llama}", f"forget={forget}", f"retain={retain}",
                           f"out={tmp_path / 'out'}", "forget_samples=8", "retain_samples=8", "seqlen=32",
                           "eval_seqlen=32", "eval_chars=1500", "options={steps: 3, layer: 1, batch_size: 2}")
    assert summary["method"] == "rmu" and summary["unlearn"]["changed"]  # RMU moved the targeted weights
    assert set(summary["perplexity"]) == {"forget", "retain"}


def test_shipped_heal_pipeline_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    """compress -> heal -> gate: heal reads compress's output and the gate reads heal's."""
    from subspace_cli.pipelines.pipeline_run import run_recipe

    work = tmp_path / "work"
    result = run_recipe(RECIPES / "pipeline-smollm2-compress-heal-gate.yaml", [
        f"model={tiny_llama}", f"work={work}", "steps=3",
        f"compressed.calib=[{text_file}]", "compressed.calib_samples=8", "compressed.calib_seqlen=32",
        "compressed.eval_seqlen=32", "compressed.eval_chars=2000",
        f"healed.heal_data=[{text_file}]", f"healed.eval=[{text_file}]", "healed.heal_seqlen=32",
        "healed.heal_batch_size=4", "healed.eval_seqlen=32", "healed.eval_chars=2000",
        f"gate.data={text_file}", "gate.eval_seqlen=32", "gate.eval_chars=2000", "gate.task_examples=5",
        "gate.fail_if=[ppl_ratio>2.0]"])  # a random tiny model scores 0 on lambada: its acc_ratio is NaN
    summary = json.loads(json.dumps(result.summary() if hasattr(result, "summary") else result, default=str))
    assert summary["ok"], summary
    healed = json.loads((work / "healed" / "report.json").read_text())
    assert healed["healing"]["steps"] == 3 and healed["healing"]["teacher"] == str(tiny_llama)
    assert healed["healing"]["params_before"] == healed["healing"]["params_after"]


def test_shipped_eval_recipe_on_a_tiny_model(tiny_llama, text_file):
    summary = _run_shipped("eval-smollm2-gate.yaml", f"model={tiny_llama}", f"baseline={tiny_llama}", f"data={text_file}",
                           "eval_seqlen=64", "eval_chars=2000")
    assert summary["ok"] and summary["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)  # a model against itself
    assert [(g["condition"], g["failed"]) for g in summary["gates"]] == [("ppl_ratio>2.0", False), ("kl>1.0", False)]


def test_shipped_inspect_recipe_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    plot = tmp_path / "spectra.png"
    summary = _run_shipped("inspect-smollm2.yaml", f"model={tiny_llama}", f"calib={text_file}", "calib_samples=4",
                           "calib_seqlen=32", f"plot={plot}")
    assert summary["summary"]["n_matrices"] == 14  # 2 blocks × (q, k, v, o, gate, up, down)
    assert summary["calibration"]["data"] == str(text_file) and plot.stat().st_size > 0
