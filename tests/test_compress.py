"""The compress verb end to end on tiny models, and its error paths (exit 2, nothing written)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from method_contracts import low_rank_names
from cli_runner import run_cli as cli, run_module
from subspace_cli.modules.checkpoint import param_count
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import LowRankLinear
from subspace_cli.pipelines.compress import compress_and_write, run_compress
from subspace_cli.pipelines.compress_config import CompressConfig

TINY = dict(calib_samples=8, calib_seqlen=32, eval_seqlen=64, eval_chars=2000)


def _config(model, out, calib, **kw):
    return CompressConfig(model=str(model), out=str(out), calib=[str(calib)], **{**TINY, **kw})


@pytest.mark.parametrize("method", low_rank_names())
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_compress_meets_ratio_and_round_trips(tiny_model, text_file, tmp_path, method, allocation):
    out = tmp_path / "out"
    report = run_compress(_config(tiny_model, out, text_file, method=method, allocation=allocation, ratio=0.3))
    p = report.params
    assert p.targeted_ratio_removed >= 0.3 - 0.02  # budget met within rank granularity of 32-wide matrices
    assert p.targeted_after == sum(m.params_after for m in report.matrices)
    for m in report.matrices:
        assert m.rank is None or m.params_after < m.params_before  # factor only where it saves
        assert 0.0 <= m.energy_kept <= 1.0 + 1e-9
    loaded = load_model(out)
    assert param_count(loaded) == p.model_after
    assert {f.name for f in out.iterdir()} >= {"config.json", "model.safetensors", "report.json", "report.md", "recipe.yaml"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema_version"] == 2 and on_disk["method"] == method


def test_written_checkpoint_matches_in_memory_model(tiny_llama, text_file, tmp_path):
    """Round trip: the in-memory compressed model and the loaded checkpoint agree (atol 1e-5, fp32)."""
    config = _config(tiny_llama, tmp_path / "out", text_file, ratio=0.4)
    report, model = compress_and_write(config)
    probe = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    loaded = load_model(config.out)
    with torch.no_grad():
        assert torch.allclose(loaded(probe).logits, model(probe).logits, atol=1e-5)
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert param_count(loaded) == report.params.model_after


def test_sequential_and_deterministic(tiny_llama, text_file, tmp_path):
    a = run_compress(_config(tiny_llama, tmp_path / "a", text_file))
    b = run_compress(_config(tiny_llama, tmp_path / "b", text_file))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    one_shot = run_compress(_config(tiny_llama, tmp_path / "c", text_file, sequential=False))
    # Block 0 sees the same inputs either way; later blocks see compressed activations only when sequential.
    first = [m for m in a.matrices if ".layers.0." in m.name]
    assert [m.whitened_rel_error for m in first] == pytest.approx(
        [m.whitened_rel_error for m in one_shot.matrices if ".layers.0." in m.name], rel=1e-9)
    assert a.matrices[-1].whitened_rel_error != pytest.approx(one_shot.matrices[-1].whitened_rel_error, rel=1e-12)
    assert b.params == a.params


def test_dense_format_loads_without_remote_code(tiny_gpt2, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    run_compress(_config(tiny_gpt2, out, text_file, format="dense", ratio=0.5))
    config = json.loads((out / "config.json").read_text())
    assert "subspace" not in config and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_targets_and_exclude(tiny_llama, text_file, tmp_path):
    report = run_compress(_config(tiny_llama, tmp_path / "o", text_file, targets=r"mlp\.", exclude="down_proj"))
    names = {m.name.rsplit(".", 1)[-1] for m in report.matrices}
    assert names == {"gate_proj", "up_proj"}


def test_cli_json_and_recipe_rerun(tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    res = cli("compress", tiny_llama, "--out", out, "--calib", text_file, "--calib-samples", 8, "--calib-seqlen", 32,
              "--eval-seqlen", 64, "--eval-chars", 2000, "--method", "asvd", "-O", "alpha=0.25", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["ok"] and summary["method"] == "asvd" and summary["config"]["options"] == {"alpha": 0.25}
    assert summary["method_options"]["alpha"] == 0.25 and "expert_grams" in summary["method_options"]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["verb"] == "compress"
    again = tmp_path / "again"
    res = cli("run", out / "recipe.yaml", "--set", f"out={again}", "--json")
    assert res.returncode == 0, res.stderr
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def _assert_usage_error(res, needle):
    assert res.returncode == 2, (res.stdout, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr


def test_error_missing_model(tmp_path, text_file):
    res = cli("compress", tmp_path / "nope", "--out", tmp_path / "o", "--calib", text_file)
    _assert_usage_error(res, "does not exist")
    assert not (tmp_path / "o").exists()


def test_python_m_entry_point_exits_2_with_one_error_line(tmp_path):
    # The other CLI tests run the app in-process; this runs a real `python -m subspace_cli` (a parse
    # error: no torch import, so it stays under a second).
    res = run_module("compress", tmp_path / "nope", "--out", tmp_path / "o", "--no-such-flag")
    _assert_usage_error(res, "--no-such-flag")
    assert not (tmp_path / "o").exists()


def test_error_hub_id_offline(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = cli("compress", "someorg/some-model", "--out", tmp_path / "o", "--calib", text_file)
    _assert_usage_error(res, "local")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_error_ratio_outside_unit_interval(tiny_llama, text_file, tmp_path, ratio):
    res = cli("compress", tiny_llama, "--out", tmp_path / "o", "--calib", text_file, "--ratio", ratio)
    _assert_usage_error(res, "--ratio")
    assert not (tmp_path / "o").exists()


def test_error_empty_calibration_file(tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    res = cli("compress", tiny_llama, "--out", tmp_path / "o", "--calib", empty)
    _assert_usage_error(res, "empty")
    assert not (tmp_path / "o").exists()


def test_error_non_empty_output_untouched(tiny_llama, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = cli("compress", tiny_llama, "--out", out, "--calib", text_file)
    _assert_usage_error(res, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_error_corrupted_safetensors(tiny_llama, text_file, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = cli("compress", broken, "--out", tmp_path / "o", "--calib", text_file)
    _assert_usage_error(res, "model")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))  # no temporary sibling left behind


def test_error_unknown_method_and_option(tiny_llama, text_file, tmp_path):
    _assert_usage_error(cli("compress", tiny_llama, "--out", tmp_path / "o", "--method", "nope"), "valid: asvd, cospadi, svd, svd-llm")
    _assert_usage_error(cli("compress", tiny_llama, "--out", tmp_path / "o", "--method", "asvd", "-O", "beta=1"), "beta")


def test_help_does_not_import_torch():
    code = "import sys; from subspace_cli.cli import app; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr


def test_every_config_field_is_a_cli_flag():
    """Options are declared once in CompressConfig; the CLI must expose each of them."""
    import inspect

    from subspace_cli.cli.compress import compress

    params = set(inspect.signature(compress).parameters) | {"options"}
    assert set(CompressConfig.model_fields) <= params


def test_self_calibration_mixes_and_is_seeded(tiny_llama, text_file, tmp_path):
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.pipelines.datasets import calibration_ids

    loaded = load_model_and_tokenizer(str(tiny_llama))
    config = CompressConfig(model=str(tiny_llama), out=str(tmp_path / "o"), calib=["self", str(text_file)],
                            **{**TINY, "calib_samples": 6})
    ids = calibration_ids(config, loaded.model, loaded.tokenizer)
    assert ids.shape == (6, 32)
    assert torch.equal(ids, calibration_ids(config, loaded.model, loaded.tokenizer))  # same seed, same text
    other = calibration_ids(config.model_copy(update={"seed": 1}), loaded.model, loaded.tokenizer)
    assert not torch.equal(ids[3:], other[3:])  # the generated half depends on the seed


def test_shipped_recipe_validates_and_typos_exit_2(tmp_path):
    """`subspace run --dry-run` checks recipes/ without loading weights; a misspelt field is named."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "compress-smollm2-svd-llm.yaml"
    res = cli("run", recipe, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["verb"] == "compress" and plan["config"]["method"] == "svd-llm" and plan["config"]["ratio"] == 0.2
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text().replace("ratio:", "ration:"))
    _assert_usage_error(cli("run", typo, "--dry-run"), "'ration'")
