"""The adapt verb on tiny models: every method's saved adapter reproduces the trained model when
PEFT loads it on the untouched base, resume is exact, and bad input exits 2 writing nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli as cli
from method_contracts import adapter_round_trip_error, method_names
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.pipelines.adapt import run_adapt
from subspace_cli.pipelines.adapt_config import AdaptConfig

TINY = dict(rank=2, steps=4, seqlen=32, batch_size=4, warmup_steps=1, eval_every=2)
ADAPT_METHODS = method_names("adapt")


def _config(model, out, data, **kw):
    return AdaptConfig(model=str(model), out=str(out), data=[str(data)], **{**TINY, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ADAPT_METHODS)
def test_saved_adapter_reproduces_the_trained_model(tiny_llama, text_file, tmp_path, method):
    """Train in memory, export, load with PeftModel.from_pretrained on an untouched base: same logits."""
    err = adapter_round_trip_error(method, tiny_llama, text_file, tmp_path)
    assert err < 1e-4, f"{method}: max |Δlogit| {err:.2e}"  # measured ≤ 3e-6 on every method


def test_cli_writes_adapter_report_plot_and_merged_model(tiny_llama, text_file, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    proc = cli("adapt", tiny_llama, "--method", "lora", "--data", text_file, "--out", out, "--rank", 2,
               "--steps", 4, "--seqlen", 32, "--lr", "1e-2", "--eval-every", 2, "--merge", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    for name in ("adapter_config.json", "adapter_model.safetensors", "report.json", "report.md", "recipe.yaml",
                 "training_curve.png", "merged/config.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    training = report["training"]
    # LoRA rank 2 on 7 projections × 2 blocks, r·(in + out) each: q, o 32→32; k, v 32→16 (GQA); gate, up, down 32↔64.
    assert training["trainable_params"] == sum(a["trainable"] for a in report["adapters"])
    assert training["trainable_params"] == 2 * 2 * (2 * 64 + 2 * 48 + 3 * 96)
    assert [e["step"] for e in training["evals"]] == [2, 4]
    assert len(training["curve"]) == 4 and "curve" not in summary["training"]
    held_out = report["perplexity"]["held-out"]
    assert held_out["after"] < held_out["before"]  # 4 steps at lr 1e-2 fit the char-level text
    merged = load_model_and_tokenizer(str(out / "merged"), with_tokenizer=False).model
    adapter = PeftModel.from_pretrained(load_model_and_tokenizer(str(tiny_llama), with_tokenizer=False).model, out)
    ids = torch.arange(40).reshape(2, 20) + 4
    assert torch.allclose(_logits(merged, ids), _logits(adapter.eval(), ids), atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "svfit"])  # a PEFT-trained and a subspace-owned adapter
def test_resume_reproduces_the_uninterrupted_adapter_exactly(tiny_llama, text_file, tmp_path, method):
    common = dict(method=method, steps=6, save_every=3, checkpoint_dir=str(tmp_path / "ckpt"))
    run_adapt(_config(tiny_llama, tmp_path / "full", text_file, **common))
    assert (tmp_path / "ckpt" / "step-000003" / "trainer.json").is_file()
    resumed = run_adapt(_config(tiny_llama, tmp_path / "resumed", text_file, resume=str(tmp_path / "ckpt"),
                                **{**common, "checkpoint_dir": str(tmp_path / "ckpt2")}))
    assert resumed.training.resumed_from == 3
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert full.keys() == again.keys()
    for key in full:
        assert torch.equal(full[key], again[key]), key  # bitwise: same rows, same optimizer state, same RNG
    first = json.loads((tmp_path / "full" / "report.json").read_text())["training"]["curve"]
    assert resumed.training.curve == first


def test_resume_refuses_a_checkpoint_from_other_options(tiny_llama, text_file, tmp_path):
    run_adapt(_config(tiny_llama, tmp_path / "a", text_file, method="lora", steps=4, save_every=2,
                      checkpoint_dir=str(tmp_path / "ckpt")))
    proc = cli("adapt", tiny_llama, "--data", text_file, "--out", tmp_path / "b", "--rank", 3, "--steps", 4,
               "--seqlen", 32, "--resume", tmp_path / "ckpt")
    assert proc.returncode == 2 and "other options" in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "valid:"),
    (["--rank", "0"], "--rank"),
    (["--rank", "33"], "exceeds min(out, in) = 32"),
    (["--targets", "no_such_layer"], "q_proj"),  # the message lists what the blocks hold
    (["-O", "bogus=1"], "valid options"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_llama, text_file, tmp_path, args, message):
    out = tmp_path / "out"
    proc = cli("adapt", tiny_llama, "--data", text_file, "--out", out, "--steps", 1, "--seqlen", 32, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ("", "no training examples"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n', "instruction"),
])
def test_bad_data_exits_2(tiny_llama, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    proc = cli("adapt", tiny_llama, "--data", data, "--out", tmp_path / "out", "--steps", 1, "--seqlen", 32,
               "--format", "alpaca" if content else "auto")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_shipped_adapt_recipe_validates_and_runs_on_a_tiny_model(tiny_llama, text_file, tmp_path):
    """recipes/adapt-smollm2-dora.yaml: a dry run resolves it; with the model and data swapped for
    tiny ones it trains, writes a PEFT DoRA adapter and a merged model that agree."""
    from pathlib import Path

    from peft import PeftModel

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "adapt-smollm2-dora.yaml"
    dry = cli("run", recipe, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["verb"] == "adapt" and plan["config"]["method"] == "dora" and plan["config"]["merge"] is True
    out = tmp_path / "out"
    proc = cli("run", recipe, "--set", f"model={tiny_llama}", "--set", f"data={text_file}", "--set", f"out={out}",
               "--set", "rank=2", "--set", "steps=3", "--set", "seqlen=32", "--set", "warmup_steps=1",
               "--set", "eval_every=0", "--set", "lr=1e-2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    merged = load_model_and_tokenizer(str(out / "merged"), with_tokenizer=False).model
    adapter = PeftModel.from_pretrained(load_model_and_tokenizer(str(tiny_llama), with_tokenizer=False).model, out)
    ids = torch.arange(40).reshape(2, 20) + 4
    base = load_model_and_tokenizer(str(tiny_llama), with_tokenizer=False).model
    assert (_logits(adapter.eval(), ids) - _logits(base, ids)).abs().max() > 1e-4  # training moved the model
    assert torch.allclose(_logits(merged, ids), _logits(adapter.eval(), ids), atol=1e-5)


def test_every_adapt_config_field_is_a_cli_flag():
    """Options are declared once in AdaptConfig; the CLI must expose each of them."""
    import inspect

    from subspace_cli.cli.adapt import adapt

    params = set(inspect.signature(adapt).parameters) | {"options"}
    assert set(AdaptConfig.model_fields) <= params
