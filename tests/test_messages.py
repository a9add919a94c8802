"""Error messages name what the user gave, in the verb's own flags (issue 15, defect 11), and resuming
a run that turned non-finite is a runtime failure (defect 3)."""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from subspace_cli.cli.app import app
from tiny_models import make_tiny_llama, write_text

TINY_ADAPT = ["--steps", "2", "--seqlen", "16", "--batch-size", "2", "--eval-every", "0", "--eval-rows", "2",
              "--warmup-steps", "0"]


def error_line(*args, code: int = 2) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture()
def short(tmp_path):
    return write_text(tmp_path / "short.txt", "To be.")


def test_eval_calls_a_short_text_short(llama, short):
    """Before: "no tokens to score: --eval-seqlen must be at least 2" for a text of a few characters."""
    line = error_line("eval", llama, "--data", short, "--eval-seqlen", "64")
    assert f"--data '{short}'" in line and "token(s)" in line and "--split all" in line
    assert "--eval-seqlen must" not in line
    line = error_line("eval", llama, "--data", write_text(short, "a"), "--split", "all", "--eval-seqlen", "64")
    assert "has 1 token(s); scoring needs at least 2" in line


@pytest.mark.parametrize("verb, args, flags", [
    ("eval", ["--data", "MISSING"], ["--data 'MISSING'"]),
    ("unlearn", ["--forget", "SHORT", "--retain", "TEXT", "--out", "OUT"], ["--forget 'SHORT'", "--seqlen 128"]),
    ("unlearn", ["--forget", "TEXT", "--retain", "MISSING", "--out", "OUT"], ["--retain 'MISSING'"]),
    ("adapt", ["--data", "MISSING", "--out", "OUT"], ["--data 'MISSING'"]),
    ("merge", ["MODEL", "--method", "linear", "--eval", "PAIR", "--out", "OUT"], ["--eval 'MISSING'"]),
])
def test_data_errors_name_the_verbs_own_flags(llama, short, tmp_path, verb, args, flags):
    """Before: "calibration data 'x' does not exist" and "--calib-seqlen" from eval, unlearn and merge."""
    values = {"MISSING": str(tmp_path / "nope.txt"), "SHORT": str(short), "TEXT": str(write_text(tmp_path / "t.txt")),
              "OUT": str(tmp_path / "out"), "MODEL": str(llama), "PAIR": f"t={tmp_path / 'nope.txt'}"}
    line = error_line(verb, llama, *[values.get(a, a) for a in args])
    for flag in flags:
        assert flag.replace("MISSING", values["MISSING"]).replace("SHORT", values["SHORT"]) in line, line
    assert "calibration" not in line and "--calib" not in line


def test_missing_tokenizer_is_named_as_such(llama, tmp_path):
    """Before: a message about sentencepiece / tiktoken from transformers' tokenizer fallback."""
    bare = shutil.copytree(llama, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    line = error_line("eval", bare, "--data", write_text(tmp_path / "t.txt"), "--eval-seqlen", "32")
    assert f"model directory '{bare}' has no tokenizer files" in line and "sentencepiece" not in line.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_devices_auto_speaks_of_devices(llama, tmp_path):
    """Before: "--device cuda: ... pass --device cpu" for `--devices auto`, a flag the user did not give."""
    line = error_line("eval", llama, "--data", write_text(tmp_path / "t.txt"), "--devices", "auto")
    assert line.startswith("error: --devices auto:") and "--device cuda" not in line


def test_resuming_a_run_that_turned_non_finite_is_exit_3(llama, tmp_path):
    """A checkpoint whose adapter weights hold NaN: exit 3 at stage resume, naming the tensor."""
    from safetensors.torch import load_file, save_file

    text = write_text(tmp_path / "t.txt")
    common = ["adapt", llama, "--data", text, *TINY_ADAPT, "--save-every", "1"]
    result = CliRunner().invoke(app, [str(a) for a in (*common, "--out", tmp_path / "a")])
    assert result.exit_code == 0, result.stderr
    step = tmp_path / "a.checkpoints" / "step-000001"
    tensors = load_file(step / "trainable.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, step / "trainable.safetensors")
    line = error_line(*common, "--resume", step, "--out", tmp_path / "b", code=3)
    assert line.startswith("error: resume: checkpoint") and f"NaN or Inf in '{name}'" in line
    assert not (tmp_path / "b").exists()
