"""`--device` is checked before any weights are read: exit 2 with a message, nothing written."""

import pytest
import torch
from typer.testing import CliRunner

from subspace_cli.cli.app import app
from subspace_cli.errors import UsageError
from subspace_cli.io.devices import check_device
from tiny_models import perturbed_copy


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_known_devices_pass():
    check_device("cpu")
    check_device("meta")


def test_malformed_device_names_the_valid_ones():
    with pytest.raises(UsageError, match=r"--device gpu: 'gpu' is not a torch device.*valid: cpu, cuda"):
        check_device("gpu")


def test_cuda_without_a_gpu(no_gpu):
    with pytest.raises(UsageError, match=r"--device cuda: .*pass --device cpu"):
        check_device("cuda")


def test_gpu_index_past_the_last(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"cuda:5: this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        check_device("cuda:5")
    check_device("cuda:1")


@pytest.mark.parametrize("verb", ["compress", "adapt", "unlearn", "merge", "eval", "inspect"])
def test_every_verb_exits_2_and_writes_nothing(verb, no_gpu, tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    args = {
        "compress": ["compress", tiny_llama, "--calib", text_file, "--out", out],
        "adapt": ["adapt", tiny_llama, "--data", text_file, "--out", out],
        "unlearn": ["unlearn", tiny_llama, "--forget", text_file, "--retain", tiny_llama / "config.json", "--out", out],
        "merge": ["merge", "--base", tiny_llama, perturbed_copy(tiny_llama, tmp_path / "a", 1),
                  perturbed_copy(tiny_llama, tmp_path / "b", 2), "--method", "ties", "--out", out],
        "eval": ["eval", tiny_llama, "--data", text_file],
        "inspect": ["inspect", tiny_llama],
    }[verb]
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda:" in result.output and "pass --device cpu" in result.output
    assert not out.exists()
