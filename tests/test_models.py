"""Model references: local directories, cached hub ids, errors."""

import shutil

import pytest

from subspace_cli.errors import UsageError
from subspace_cli.io.models import resolve_model_path
from subspace_cli.modules.loading import load_model_and_tokenizer


def _fake_hub_cache(root, repo_id, source):
    """The Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_hub_id_resolves_from_local_cache(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_llama)
    assert resolve_model_path("acme/tiny-llama").resolve() == snapshot.resolve()
    loaded = load_model_and_tokenizer("acme/tiny-llama")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_uncached_hub_id_says_pass_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="pass the local directory path"):
        resolve_model_path("acme/not-cached")


def test_directory_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_pickle_only_refused_without_flag(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(UsageError, match="--allow-pickle"):
        load_model_and_tokenizer(str(pickled))
    assert load_model_and_tokenizer(str(pickled), allow_pickle=True).model is not None


def test_quantized_checkpoint_refused_with_exit_2(tiny_llama, text_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from subspace_cli.cli.app import app

    quantized = tmp_path / "gptq"
    shutil.copytree(tiny_llama, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"quantized \(quant_method: gptq\).*full-precision"):
        load_model_and_tokenizer(str(quantized))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(quantized), "--calib", str(text_file),
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "quantized" in result.output and not out.exists()
