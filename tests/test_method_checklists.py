"""A new method of a kind already present needs only its module, its registration and a docs row
(docs/contributing.md). Here a throwaway low-rank compress method, tensor merge and adapter method are
registered the way a method module registers itself; each must then appear in `subspace methods`, run
through its verb's `--method`, be listed by `subspace schema`, and enter the registry-generated case
tables, which run the verb's contract checks on it. Each is removed again afterwards.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from pydantic import Field

from cli_runner import run_cli
from method_contracts import adapter_round_trip_error, merge_contract, method_names
from subspace_cli.linalg.truncation import Transform
from subspace_cli.methods.adapt.base import AdapterMethod
from subspace_cli.methods.adapt.lora_family import LoraConfig
from subspace_cli.methods.catalog import method_for_config, methods_for
from subspace_cli.methods.compress.base import LowRankMethod
from subspace_cli.methods.merge.base import TensorMerge, fp32
from subspace_cli.methods.registry import MethodConfig, Needs, register, unregister
from subspace_cli.pipelines.verbs import config_classes
from tiny_models import make_tiny_llama, write_text


# ----------------------------------------------------------------------------- the throwaway methods
# Each is what a method module would hold: a config class, the verb's entry point, one register() call.

class ColumnScaledConfig(MethodConfig):
    power: float = Field(1.0, ge=0.0, description="exponent on the column norms of W")


def column_scaled_transform(weight: torch.Tensor, stats, config: ColumnScaledConfig) -> Transform:
    scale = weight.double().norm(dim=0).clamp_min(1e-12).pow(config.power)  # [in]
    return Transform("diagonal", scale)


class MedianConfig(MethodConfig):
    pass


def merge_median(inputs, config: MedianConfig) -> torch.Tensor:
    return torch.stack([fp32(m) for m in inputs.models]).median(dim=0).values


class ScaledLoraConfig(LoraConfig):
    pass


def throwaway_methods() -> list:
    lora = methods_for("adapt")["lora"]
    return [
        LowRankMethod(name="column-scaled-svd", config_class=ColumnScaledConfig, transform=column_scaled_transform,
                      paper="none (a test method)", summary="SVD of W scaled by its column norms"),
        TensorMerge(name="median", config_class=MedianConfig, merge=merge_median,
                    paper="none (a test method)", summary="elementwise median of the models"),
        AdapterMethod(name="lora-again", config_class=ScaledLoraConfig, attach=lora.attach, default_lr=1e-3,
                      paper="none (a test method)", summary="LoRA under another name",
                      needs={Needs.TRAINING_DATA}),
    ]


@contextlib.contextmanager
def registered(methods):
    for method in methods:
        register(method)
    try:
        yield methods
    finally:
        for method in methods:
            unregister(method)


# ----------------------------------------------------------------------------- the checks


@pytest.mark.slow
def test_registered_methods_appear_everywhere_and_run(tmp_path):
    model = make_tiny_llama(tmp_path / "llama")
    other = make_tiny_llama(tmp_path / "llama-2", seed=1)
    text = write_text(tmp_path / "text.txt")
    with registered(throwaway_methods()) as methods:
        # `subspace methods`: listed with summary and options
        listed = json.loads(run_cli("methods", "--json").stdout)["methods"]
        assert {(m.verb, m.name) for m in methods} <= {(e["verb"], e["name"]) for e in listed}
        one = json.loads(run_cli("methods", "column-scaled-svd", "--json").stdout)["methods"][0]
        assert one["options"]["power"]["default"] == 1.0
        assert json.loads(run_cli("methods", "lora-again", "--json").stdout)["methods"][0]["default_lr"] == 1e-3

        # `subspace schema`: the method name and its options
        schema = json.loads(run_cli("schema").stdout)
        for method in methods:
            config = schema["$defs"][config_classes()[method.verb].__name__]
            assert method.name in config["properties"]["method"]["enum"]
            assert f"MethodOptions-{method.verb}-{method.name}" in schema["$defs"]

        # the case tables the per-method tests are generated from
        for method in methods:
            assert method.name in method_names(method.verb)

        # each verb's --method runs it end to end
        runs = {
            "compress": ["compress", model, "--method", "column-scaled-svd", "-O", "power=0.5", "--ratio", "0.3",
                         "--calib-samples", "4", "--calib-seqlen", "32", "--skip-eval"],
            "merge": ["merge", model, other, "--method", "median"],
            "adapt": ["adapt", model, "--method", "lora-again", "--data", text, "--rank", "2", "--steps", "2",
                      "--seqlen", "32", "--warmup-steps", "0", "--eval-every", "0"],
        }
        for method in methods:
            out = tmp_path / f"out-{method.verb}"
            result = run_cli(*runs[method.verb], "--out", out, "--quiet")
            assert result.returncode == 0, result.stderr
            report = json.loads((out / "report.json").read_text())
            assert report["method"] == method.name and report["config"]["method"] == method.name
            assert report["method_options"] == method.make_config({"power": 0.5} if method.verb == "compress"
                                                                  else {}).model_dump(mode="json")

        # and the verb contracts the registry-generated tests run on every method
        merge_contract("median")
        assert adapter_round_trip_error("lora-again", model, text, tmp_path / "round-trip") < 1e-4
    for method in methods:  # removed again: nothing leaks into other tests
        assert method.name not in methods_for(method.verb)


def test_a_config_class_names_one_method():
    for verb in ("compress", "adapt", "merge", "unlearn"):
        for method in methods_for(verb).values():  # a resolved config names its method, no string needed
            assert method_for_config(method.make_config({})) is method
    lora = methods_for("adapt")["lora"]
    clash = AdapterMethod(name="lora-clash", config_class=type(lora.make_config({})), attach=lora.attach,
                          default_lr=1e-3, paper="-", summary="-")
    with pytest.raises(ValueError, match="already belongs to method 'lora'"):
        register(clash)
    assert "lora-clash" not in methods_for("adapt")


@pytest.mark.parametrize("method", method_names("merge"))
def test_every_tensor_merge_meets_the_contract(method):
    merge_contract(method)
