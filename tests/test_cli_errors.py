"""The CLI's error boundary: every failure is one `error:` line with exit 2 (input) or 3 (runtime,
naming the stage), never a traceback; `--json` gets an error object; output is strict JSON."""

import json
import os
import signal

import pytest
from typer.testing import CliRunner

from subspace_cli.cli.app import app
from tiny_models import make_tiny_llama, write_text

TINY_COMPRESS = ["--calib-samples", "4", "--calib-seqlen", "16", "--eval-seqlen", "32", "--eval-chars", "500"]
TINY_ADAPT = ["--steps", "3", "--seqlen", "16", "--batch-size", "2", "--eval-every", "0", "--eval-rows", "2"]


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


@pytest.fixture()
def llama(tmp_path):
    return make_tiny_llama(tmp_path / "llama")


@pytest.mark.parametrize("args, fragment", [
    (["compress", "m", "--out", "o", "--ratio", "abc"], "Invalid value for '--ratio'"),
    (["compress", "m", "--out", "o", "--bogus"], "No such option: --bogus"),
    (["compress", "--out", "o"], "Missing argument"),
    (["adapt", "m", "--out", "o", "--steps", "x"], "Invalid value for '--steps'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_parse_errors_are_one_line_and_json(args, fragment):
    """Before: click's multi-line box without `error:`, and nothing on stdout with --json."""
    line = assert_one_error(invoke(*args), 2)
    assert fragment in line and "--help" in line
    payload = strict_loads(invoke(*args, "--json").stdout)
    assert payload["ok"] is False and payload["exit_code"] == 2 and fragment in payload["error"]


@pytest.mark.parametrize("verb", ["compress", "adapt", "merge", "unlearn"])
@pytest.mark.parametrize("pair, fragment", [("rank", "is not KEY=VALUE"), ("layers=[1,", "value is not valid YAML")])
def test_bad_method_option_is_exit_2_naming_the_flag(llama, tmp_path, verb, pair, fragment):
    """`-O` is read like `subspace run --set` (one parser, io/yaml_files.py). Before: a value that is not
    YAML (`-O layers=[1,`) escaped as an unexpected ScannerError, exit 3."""
    text = str(write_text(tmp_path / "t.txt"))
    inputs = {"merge": [llama, llama], "unlearn": [llama, "--forget", text, "--retain", text]}.get(verb, [llama])
    line = assert_one_error(invoke(verb, *inputs, "--out", tmp_path / "out", "-O", pair), 2)
    assert f"-O '{pair}'" in line and fragment in line
    assert not (tmp_path / "out").exists()


def test_unexpected_exception_is_exit_3_naming_the_stage(llama, tmp_path, monkeypatch):
    """Before: a traceback and exit 1. Now: exit 3, the stage, the cause, and --debug for the traceback."""
    import subspace_cli.pipelines.compress as compress

    def broken(*args, **kwargs):
        raise AttributeError("'LowRankLinear' object has no attribute 'bias'")

    monkeypatch.setattr(compress, "compress_model", broken)
    text = write_text(tmp_path / "t.txt")
    args = ["compress", llama, "--calib", text, *TINY_COMPRESS, "--out", tmp_path / "out"]
    line = assert_one_error(invoke(*args), 3)
    assert line.startswith("error: compress: unexpected AttributeError:") and "--debug" in line
    assert not (tmp_path / "out").exists()
    debug = invoke(*args, "--debug")
    assert debug.exit_code == 3 and "Traceback" in debug.stderr and "broken" in debug.stderr


def test_out_of_memory_is_exit_3_naming_the_stage(llama, tmp_path, monkeypatch):
    """The CPU allocator's failure ("can't allocate memory"), which "out of memory" did not match."""
    import subspace_cli.pipelines.adapt as adapt

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 42949672960 bytes.")

    monkeypatch.setattr(adapt, "train", allocate)
    result = invoke("adapt", llama, "--data", write_text(tmp_path / "t.txt"), *TINY_ADAPT, "--out", tmp_path / "out")
    line = assert_one_error(result, 3)
    assert line.startswith("error: train: out of memory") and "troubleshooting" in line


def test_interrupt_names_the_checkpoints_it_kept(llama, tmp_path, monkeypatch):
    """Before: "interrupted; nothing was written" after training checkpoints had been written."""
    import subspace_cli.pipelines.trainer as trainer

    real = trainer.save_checkpoint

    def save_then_interrupt(directory, *args, **kwargs):
        real(directory, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "out"
    result = invoke("adapt", llama, "--data", write_text(tmp_path / "t.txt"), *TINY_ADAPT, "--save-every", "1",
                    "--out", out)
    line = assert_one_error(result, 130)
    assert "during stage 'train'" in line and "not written" in line
    assert f"kept: training checkpoints in {out}.checkpoints" in line
    assert not out.exists() and (tmp_path / "out.checkpoints" / "step-000001").is_dir()


def test_sigterm_is_handled_like_ctrl_c(llama, tmp_path, monkeypatch):
    """SIGTERM (a scheduler ending a job) unwinds like Ctrl-C: the temporary output is removed."""
    import subspace_cli.pipelines.compress as compress

    real = compress.write_checkpoint

    def write_then_terminate(model, directory, **kwargs):
        real(model, directory, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(compress, "write_checkpoint", write_then_terminate)
    result = invoke("compress", llama, "--calib", write_text(tmp_path / "t.txt"), *TINY_COMPRESS,
                    "--out", tmp_path / "out", "--json")
    line = assert_one_error(result, 143)
    assert "interrupted (SIGTERM) during stage 'write'" in line
    assert strict_loads(result.stdout)["exit_code"] == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "t.txt"]  # no out, no .out.tmp-*
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


def test_json_and_report_are_strict_with_infinite_metrics(llama, tmp_path, monkeypatch):
    """Before: `"ppl": Infinity` in --json and report.json, which strict parsers reject."""
    import subspace_cli.pipelines.compress as compress

    monkeypatch.setattr(compress, "perplexity",
                        lambda *args, **kwargs: {"ppl": float("inf"), "nll": float("nan"), "n_tokens": 10})
    out = tmp_path / "out"
    result = invoke("compress", llama, "--calib", write_text(tmp_path / "t.txt"), *TINY_COMPRESS, "--out", out,
                    "--json")
    assert result.exit_code == 0, result.stderr
    summary = strict_loads(result.stdout)
    ppl = next(iter(summary["perplexity"].values()))
    assert ppl["before"] is None and ppl["non_finite"]["before"] == "inf"
    report = strict_loads((out / "report.json").read_text())
    assert next(iter(report["perplexity"].values()))["non_finite"] == {"before": "inf", "after": "inf", "ratio": "nan"}


def test_finite_json_marks_what_it_replaced():
    from subspace_cli.report.json_safe import dumps, finite_json

    value = {"a": 1.0, "b": float("-inf"), "c": [float("nan"), 2], "d": {"e": float("inf")}}
    assert finite_json(value) == {"a": 1.0, "b": None, "c": [None, 2], "d": {"e": None, "non_finite": {"e": "inf"}},
                                  "non_finite": {"b": "-inf"}}
    assert strict_loads(dumps(value))["d"]["e"] is None


@pytest.mark.parametrize("verb, extra", [
    ("compress", ["--out", "OUT", *TINY_COMPRESS, "--calib", "TEXT"]),
    ("inspect", []),
    ("eval", ["--data", "TEXT", "--eval-seqlen", "32"]),
    ("adapt", ["--out", "OUT", "--data", "TEXT", *TINY_ADAPT]),
    ("unlearn", ["--out", "OUT", "--forget", "TEXT", "--retain", "OTHER"]),
])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_weights_are_exit_2_naming_the_tensor(tmp_path, verb, extra, value):
    """Before: failures inside the SVD with a wrong hint, the learning rate blamed, or exit 0 with NaN metrics."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama(tmp_path / "llama")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 4] = float(value)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    text, other = write_text(tmp_path / "t.txt"), write_text(tmp_path / "o.txt", "Other text entirely. " * 200)
    args = [{"OUT": tmp_path / "out", "TEXT": text, "OTHER": other}.get(a, a) for a in extra]
    line = assert_one_error(invoke(verb, model, *args), 2)
    assert "NaN or Inf values in 'model.layers.1.mlp.up_proj.weight'" in line
    assert not (tmp_path / "out").exists()


def test_interrupted_pipeline_names_the_steps_it_completed(llama, tmp_path, monkeypatch):
    """A pipeline interrupted in its second step: the first step's output is complete and named."""
    import yaml

    import subspace_cli.pipelines.compress as compress

    real, calls = compress.compress_model, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compress, "compress_model", interrupt_second)
    text = write_text(tmp_path / "t.txt")
    config = {"model": str(llama), "calib": [str(text)], "calib_samples": 4, "calib_seqlen": 16, "eval_seqlen": 32,
              "eval_chars": 500}
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [
        {"name": "first", "verb": "compress", "config": {**config, "out": str(tmp_path / "first")}},
        {"name": "second", "verb": "compress", "config": {**config, "out": str(tmp_path / "second")}}]}))
    line = assert_one_error(invoke("run", recipe), 130)
    assert f"kept: step 'first' output in {tmp_path / 'first'}" in line and "during stage 'compress'" in line
    assert (tmp_path / "first" / "report.json").is_file() and not (tmp_path / "second").exists()
