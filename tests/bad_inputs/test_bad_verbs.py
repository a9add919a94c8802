"""Verb-specific bad inputs: merge (model count, adapters without --base, mismatched models,
config files), eval (gates, baselines), unlearn (forget/retain), inspect --plot, adapt
--resume, run recipes, schema --out and methods. Expected: exit 2, one `error:` line, nothing
written and every input byte-identical."""

from __future__ import annotations

import json

import pytest
import yaml

from bad_input_harness import MISSING, Case, params, run_case, std

pytestmark = pytest.mark.slow  # the bad-input sweep (hundreds of CLI runs) is the slow tier

# ----------------------------------------------------------------------------- merge


def _merge_file(content) -> Case:
    return lambda ctx: [ctx.write("merge.yaml", content), "--out", "out"]


def _merge_yaml(ctx, **fields) -> list:
    """A merge config file naming models copied into the root, plus `fields`."""
    config = {"models": [ctx.model("ft1"), ctx.model("ft2")], "base": ctx.model("llama", "base"), **fields}
    return [ctx.write("merge.yaml", yaml.safe_dump(config)), "--out", "out"]


def _mergekit_yaml(ctx, method: str) -> list:
    config = {"merge_method": method, "base_model": ctx.model("llama", "base"),
              "models": [{"model": ctx.model("ft1"), "parameters": {"weight": 1.0}},
                         {"model": ctx.model("ft2"), "parameters": {"weight": 1.0}}]}
    return [ctx.write("mergekit.yaml", yaml.safe_dump(config)), "--out", "out"]


MERGE = [
    Case("merge", "one-model", lambda ctx: std(ctx, "merge", model=MISSING)),
    Case("merge", "one-model-linear-no-base", lambda ctx: [ctx.model("ft1"), "--method", "linear", "--out", "out"]),
    Case("merge", "no-models", lambda ctx: ["--base", ctx.model("llama", "base"), "--out", "out"]),
    Case("merge", "no-base", lambda ctx: [ctx.model("ft1"), ctx.model("ft2"), "--method", "ties", "--out", "out"]),
    Case("merge", "lora-adapters-without-base",
         lambda ctx: [ctx.model("adapter", "a1"), ctx.model("adapter", "a2"), "--out", "out"]),
    Case("merge", "lora-adapter-and-model-without-base",
         lambda ctx: [ctx.model("adapter", "a1"), ctx.model("ft1"), "--method", "linear", "--out", "out"]),
    Case("merge", "lora-adapter-as-base", lambda ctx: [ctx.model("ft1"), ctx.model("ft2"),
                                                        "--base", ctx.model("adapter", "a1"), "--out", "out"]),
    Case("merge", "lora-adapter-other-base", lambda ctx: [ctx.model("adapter", "a1"), ctx.model("adapter", "a2"),
                                                           "--base", ctx.model("gpt2", "base"), "--out", "out"]),
    Case("merge", "mismatched-shapes", lambda ctx: std(ctx, "merge", model=ctx.model("wide"))),
    Case("merge", "other-model-type", lambda ctx: std(ctx, "merge", model=ctx.model("gpt2-ft"))),
    Case("merge", "base-of-other-model-type", lambda ctx: [ctx.model("ft1"), ctx.model("ft2"),
                                                           "--base", ctx.model("gpt2", "base"), "--out", "out"]),
    Case("merge", "other-tokenizer", lambda ctx: std(ctx, "merge", model=ctx.model("other-tok"))),
    Case("merge", "config-yaml-invalid", _merge_file("models: [a, b\nbase: c\n")),
    Case("merge", "config-yaml-not-mapping", _merge_file("- a\n- b\n")),
    Case("merge", "config-yaml-scalar", _merge_file("just a string\n")),
    Case("merge", "config-yaml-empty", _merge_file("")),
    Case("merge", "config-yaml-not-utf8", _merge_file("models: [caf\xe9, b]\nbase: c\n".encode("latin-1"))),
    Case("merge", "config-yaml-missing", lambda ctx: ["no-such-merge.yaml", "--out", "out"]),
    Case("merge", "config-yaml-is-directory", lambda ctx: [ctx.mkdir("merge.yaml"), "--out", "out"]),
    Case("merge", "config-yaml-unknown-field", lambda ctx: _merge_yaml(ctx, methd="ties")),
    Case("merge", "config-yaml-wrong-type", lambda ctx: _merge_yaml(ctx, weights="heavy")),
    Case("merge", "config-yaml-one-model", lambda ctx: _merge_yaml(ctx, models=[ctx.model("ft1")])),
    Case("merge", "config-yaml-out-is-base", lambda ctx: _merge_yaml(ctx)[:2] + ["base", "--overwrite"]),
    Case("merge", "mergekit-unknown-method", lambda ctx: _mergekit_yaml(ctx, "slerp_deluxe")),
    Case("merge", "mergekit-slerp", lambda ctx: _mergekit_yaml(ctx, "slerp")),
]

# ----------------------------------------------------------------------------- eval


def _gate(condition: str, *extra: str) -> Case:
    return lambda ctx: std(ctx, "eval", extra=["--fail-if", condition, *extra])


EVAL = [
    Case("eval", f"fail-if-{name}", _gate(cond)) for name, cond in [
        ("double-op", "ppl>>1"), ("no-op", "ppl"), ("no-value", "ppl>"), ("value-abc", "ppl>abc"),
        ("value-nan", "ppl>nan"), ("unknown-field", "perplexity>1"), ("empty", ""), ("spaces", "   "),
        ("python", "__import__('os')"), ("two-conditions", "ppl>1 and kl>1"), ("field-only-with-baseline", "kl>0.5"),
        ("ratio-without-baseline", "ppl_ratio>1.5"), ("bad-op", "ppl=>1"), ("trailing-junk", "ppl>1x"),
    ]
] + [
    Case("eval", "baseline-other-tokenizer", lambda ctx: std(ctx, "eval", extra=["--baseline", ctx.model("other-tok")])),
    Case("eval", "baseline-is-lora-adapter", lambda ctx: std(ctx, "eval", extra=["--baseline", ctx.model("adapter")])),
    Case("eval", "model-is-lora-adapter-dir", lambda ctx: std(ctx, "eval", model=ctx.model("adapter"))),
    Case("eval", "fail-if-valid-and-invalid", _gate("ppl>1e9", "--fail-if", "ppl>>2")),
]

# ----------------------------------------------------------------------------- unlearn, inspect


UNLEARN = [
    Case("unlearn", "forget-equals-retain", lambda ctx: std(ctx, "unlearn", data=ctx.text("same.txt"), retain="same.txt")),
    Case("unlearn", "forget-equals-retain-spelled-differently",
         lambda ctx: std(ctx, "unlearn", data=ctx.text("same.txt"), retain="./same.txt")),
    Case("unlearn", "forget-same-text-as-retain",
         lambda ctx: std(ctx, "unlearn", data=ctx.text("a.txt"), retain=ctx.text("b.txt"))),
    Case("unlearn", "forget-missing-flag", lambda ctx: std(ctx, "unlearn", data=MISSING)),
    Case("unlearn", "retain-missing-flag", lambda ctx: std(ctx, "unlearn", retain=MISSING)),
    Case("unlearn", "forget-builtin-equals-retain-builtin",
         lambda ctx: std(ctx, "unlearn", data="builtin:kjv", retain="builtin:kjv")),
]


def _plot(where) -> Case:
    return lambda ctx: std(ctx, "inspect", extra=["--plot", where(ctx)])


INSPECT = [
    Case("inspect", "plot-parent-is-file", _plot(lambda ctx: ctx.write("afile", "x\n") + "/spectra.png")),
    Case("inspect", "plot-parent-missing", _plot(lambda ctx: "no/such/dir/spectra.png")),
    Case("inspect", "plot-is-directory", _plot(lambda ctx: ctx.mkdir("plots"))),
    Case("inspect", "plot-is-model-config", _plot(lambda ctx: "model/config.json")),
    Case("inspect", "plot-is-model-weights", _plot(lambda ctx: "model/model.safetensors")),
    Case("inspect", "plot-empty-string", _plot(lambda ctx: "")),
    Case("inspect", "plot-is-calib-file", lambda ctx: std(ctx, "inspect", calib=True, extra=["--plot", "data.txt"])),
]

# ----------------------------------------------------------------------------- adapt --resume


def _resume(mutate=None, target="model.checkpoints/step-000001", *extra: str) -> Case:
    def build(ctx):
        ctx.model("ckpt", "model.checkpoints")
        if mutate is not None:
            mutate(ctx.root / "model.checkpoints" / "step-000001")
        return std(ctx, "adapt", extra=["--resume", target, *extra])

    return build


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


RESUME = [
    Case("adapt", "resume-missing-dir", lambda ctx: std(ctx, "adapt", extra=["--resume", "no-such-checkpoint"])),
    Case("adapt", "resume-empty-dir", lambda ctx: std(ctx, "adapt", extra=["--resume", ctx.mkdir("ckpts")])),
    Case("adapt", "resume-is-file", lambda ctx: std(ctx, "adapt", extra=["--resume", ctx.write("ckpt.pt", b"\x80")])),
    Case("adapt", "resume-is-output-dir", lambda ctx: std(ctx, "adapt", extra=["--resume", ctx.model("adapter")])),
    Case("adapt", "resume-state-corrupt", _resume(lambda d: (d / "state.pt").write_bytes(b"not a torch file" * 8))),
    Case("adapt", "resume-state-truncated", _resume(lambda d: _truncate(d / "state.pt"))),
    Case("adapt", "resume-state-missing", _resume(lambda d: (d / "state.pt").unlink())),
    Case("adapt", "resume-trainer-json-invalid", _resume(lambda d: (d / "trainer.json").write_text('{"step": 1,'))),
    Case("adapt", "resume-trainer-json-list", _resume(lambda d: (d / "trainer.json").write_text("[1]"))),
    Case("adapt", "resume-trainer-json-no-step", _resume(lambda d: (d / "trainer.json").write_text(
        json.dumps({k: v for k, v in json.loads((d / "trainer.json").read_text()).items() if k != "step"})))),
    Case("adapt", "resume-tensors-truncated", _resume(lambda d: _truncate(d / "trainable.safetensors"))),
    Case("adapt", "resume-tensors-missing", _resume(lambda d: (d / "trainable.safetensors").unlink())),
    Case("adapt", "resume-other-options", _resume(None, "model.checkpoints/step-000001", "--rank", "8")),
]

# ----------------------------------------------------------------------------- run




def _compress_recipe(ctx, **config) -> dict:
    base = {"model": ctx.model(), "out": "out", "calib": [ctx.text()], "calib_samples": 4, "calib_seqlen": 16,
            "eval_seqlen": 32, "eval_chars": 500}
    return {"verb": "compress", "config": {**base, **config}}


def _recipe(make, *extra: str, name: str = "recipe.yaml") -> Case:
    """make(ctx) -> the recipe as a dict (dumped as YAML) or str / bytes (written as is)."""

    def build(ctx):
        content = make(ctx)
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)
        return [ctx.write(name, content), *extra]

    return build


def _pipeline(ctx, steps, vars_=None) -> dict:
    return {**({"vars": vars_} if vars_ is not None else {}), "steps": steps}


def _inspect_step(ctx, name="look", **config) -> dict:
    return {"name": name, "verb": "inspect", "config": {"model": ctx.model(), **config}}


RUN = [
    Case("run", "recipe-missing", lambda ctx: ["no-such-recipe.yaml"]),
    Case("run", "recipe-is-directory", lambda ctx: [ctx.mkdir("recipes")]),
    Case("run", "recipe-not-utf8", _recipe(lambda ctx: "verb: inspect\nconfig: {model: caf\xe9}\n".encode("latin-1"))),
    Case("run", "recipe-binary", _recipe(lambda ctx: bytes(range(256)))),
    Case("run", "recipe-invalid-yaml", _recipe(lambda ctx: "verb: compress\nconfig: {model: [unclosed\n")),
    Case("run", "recipe-tab-indented-yaml", _recipe(lambda ctx: "verb: compress\nconfig:\n\tmodel: m\n")),
    Case("run", "recipe-empty", _recipe(lambda ctx: "")),
    Case("run", "recipe-a-list", _recipe(lambda ctx: "- verb: compress\n")),
    Case("run", "recipe-a-scalar", _recipe(lambda ctx: "compress\n")),
    Case("run", "unknown-verb", _recipe(lambda ctx: {"verb": "frobnicate", "config": {"model": ctx.model()}})),
    Case("run", "verb-run-recursive", _recipe(lambda ctx: {"verb": "run", "config": {"recipe": "recipe.yaml"}})),
    Case("run", "missing-config", _recipe(lambda ctx: {"verb": "compress"})),
    Case("run", "config-not-mapping", _recipe(lambda ctx: {"verb": "compress", "config": ["model", "out"]})),
    Case("run", "unknown-top-level-key", _recipe(lambda ctx: {**_compress_recipe(ctx), "extra": 1})),
    Case("run", "unknown-field", _recipe(lambda ctx: _compress_recipe(ctx, ratioo=0.3))),
    Case("run", "wrong-field-type", _recipe(lambda ctx: _compress_recipe(ctx, ratio="abc"))),
    Case("run", "wrong-field-type-list", _recipe(lambda ctx: _compress_recipe(ctx, calib_samples=[1, 2]))),
    Case("run", "field-out-of-range", _recipe(lambda ctx: _compress_recipe(ctx, ratio=1.5))),
    Case("run", "missing-required-field", _recipe(lambda ctx: {"verb": "compress", "config": {"model": ctx.model()}})),
    Case("run", "model-missing", _recipe(lambda ctx: _compress_recipe(ctx, model="no-such-model"))),
    Case("run", "out-is-model", _recipe(lambda ctx: _compress_recipe(ctx, out="model", overwrite=True))),
    Case("run", "out-non-empty", _recipe(lambda ctx: _compress_recipe(ctx, out=ctx.write("busy/x", "x") and "busy"))),
    Case("run", "out-is-recipe-dir", _recipe(lambda ctx: _compress_recipe(ctx, out="conf", overwrite=True),
                                             name="conf/recipe.yaml")),
    Case("run", "set-without-equals", _recipe(_compress_recipe, "--set", "ratio")),
    Case("run", "set-unknown-field", _recipe(_compress_recipe, "--set", "ratioo=0.3")),
    Case("run", "set-bad-value", _recipe(_compress_recipe, "--set", "ratio=abc")),
    Case("run", "set-bad-yaml", _recipe(_compress_recipe, "--set", "calib=[a.txt")),
    Case("run", "pipeline-var-defined-as-itself",
         _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx, model="${m}")], {"m": "${m}"}))),
    Case("run", "pipeline-vars-cycle",
         _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx, model="${a}")], {"a": "${b}", "b": "${a}"}))),
    Case("run", "pipeline-unknown-var", _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx, model="${nope}")]))),
    Case("run", "pipeline-ref-to-later-step", _recipe(lambda ctx: _pipeline(ctx, [
        _inspect_step(ctx, "first", model="${second.model}"), _inspect_step(ctx, "second", model="model")]))),
    Case("run", "pipeline-ref-to-itself", _recipe(lambda ctx: _pipeline(ctx, [
        _inspect_step(ctx, "first", model="model", plot="${first.plot}")]))),
    Case("run", "pipeline-duplicate-step-names", _recipe(lambda ctx: _pipeline(ctx, [
        _inspect_step(ctx, "same"), _inspect_step(ctx, "same", model="model")]))),
    Case("run", "pipeline-bad-step-name", _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx, "bad name!")]))),
    Case("run", "pipeline-no-steps", _recipe(lambda ctx: _pipeline(ctx, [], {"a": 1}))),
    Case("run", "pipeline-steps-not-list", _recipe(lambda ctx: {"steps": {"verb": "inspect"}})),
    Case("run", "pipeline-step-unknown-verb", _recipe(lambda ctx: _pipeline(ctx, [
        {"name": "x", "verb": "frobnicate", "config": {}}]))),
    Case("run", "pipeline-step-unknown-field", _recipe(lambda ctx: _pipeline(ctx, [
        _inspect_step(ctx, model="model", targts="mlp")]))),
    Case("run", "pipeline-two-steps-same-out", _recipe(lambda ctx: _pipeline(ctx, [
        {"name": "a", **_compress_recipe(ctx)}, {"name": "b", **_compress_recipe(ctx, model="model")}]))),
    Case("run", "pipeline-set-without-equals", _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx)]),
                                                       "--set", "look.targets")),
    Case("run", "pipeline-set-unknown-step", _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx)]),
                                                     "--set", "nosuch.targets=mlp")),
    Case("run", "pipeline-set-unknown-var", _recipe(lambda ctx: _pipeline(ctx, [_inspect_step(ctx)], {"a": 1}),
                                                    "--set", "b=2")),
    Case("run", "pipeline-and-single-step-keys", _recipe(lambda ctx: {
        **_compress_recipe(ctx), "steps": [_inspect_step(ctx, model="model")]})),
]

# ----------------------------------------------------------------------------- schema, methods

OTHER = [
    Case("schema", "out-parent-is-file", lambda ctx: ["--out", ctx.write("afile", "x\n") + "/schema.json"], json=False),
    Case("schema", "out-is-directory", lambda ctx: ["--out", ctx.mkdir("schemas")], json=False),
    Case("schema", "unknown-flag", lambda ctx: ["--frobnicate"], json=False),
    Case("methods", "unknown-method", lambda ctx: ["frobnicate"]),
    Case("methods", "unknown-flag", lambda ctx: ["--frobnicate"]),
]

CASES: list[Case] = [*MERGE, *EVAL, *UNLEARN, *INSPECT, *RESUME, *RUN, *OTHER]


@pytest.mark.parametrize("case,as_json", params(CASES))
def test_bad_verb_input(case, as_json, bad_ctx):
    run_case(case, as_json, bad_ctx)
