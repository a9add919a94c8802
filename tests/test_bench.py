"""`subspace bench`: speed and weight memory of several models side by side, ratios against the first.

Timings on a shared CPU are noise, so the tests assert what must hold whatever the timings: the
baseline's ratios are 1, the other model's ratios are the quotients of the reported figures, the
memory-bound ceiling is the inverse weight ratio, tokens per second match ms per token, and weight
bytes are those of the checkpoint's tensors. Speed targets live in benchmarks/RESULTS.md.
"""

import json

import pytest
import torch
from torch import nn

from cli_runner import run_cli
from subspace_cli.pipelines.bench import weight_bytes

FAST = ["--prompt-len", "8", "--decode-tokens", "3", "--rounds", "1", "--batch-size", "1", "--batch-size", "2"]


@pytest.fixture(scope="module")
def compressed(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "svd40"
    result = run_cli("compress", tiny_llama, "--method", "svd", "--ratio", "0.4", "--skip-eval", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow  # compresses a model first
def test_two_models_side_by_side(tiny_llama, compressed):
    result = run_cli("bench", tiny_llama, compressed, *FAST, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    dense, small = summary["models"]
    assert [dense["model"], small["model"]] == [str(tiny_llama), str(compressed)]
    for row in (dense, small):
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0
        assert set(row["tokens_per_s"]) == {"1", "2"}
        # tokens/s at batch 1 is the inverse of ms/token (same best round): 1e-9 relative
        assert row["tokens_per_s"]["1"] == pytest.approx(1e3 / row["decode_ms_per_token"], rel=1e-9)
    assert dense["weight_ratio"] == dense["prefill_speedup"] == dense["decode_speedup"] == dense["decode_ceiling"] == 1.0
    assert small["weight_ratio"] < 0.9  # 40% of the block matrices removed
    assert small["decode_ceiling"] == pytest.approx(1 / small["weight_ratio"], rel=1e-12)
    assert small["decode_speedup"] == pytest.approx(dense["decode_ms_per_token"] / small["decode_ms_per_token"], rel=1e-12)
    assert small["prefill_speedup"] == pytest.approx(dense["prefill_ms"] / small["prefill_ms"], rel=1e-12)
    assert summary["prompt_len"] == 8 and summary["rounds"] == 1 and summary["peak_rss_mb"] > 0


def test_people_get_a_table(tiny_llama):
    result = run_cli("bench", tiny_llama, *FAST, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "decode ms/token" in result.stdout and "ceiling" in result.stdout


def test_weight_bytes_count_shared_tensors_once():
    model = nn.Module()
    model.a = nn.Linear(4, 3, bias=False)
    model.b = nn.Linear(4, 3, bias=False)
    model.b.weight = model.a.weight  # tied
    model.register_buffer("codes", torch.zeros(5, dtype=torch.int16))
    assert weight_bytes(model) == 12 * 4 + 5 * 2


@pytest.mark.parametrize("args, message", [
    (["nope-not-here"], "not in the local Hugging Face cache"),
    (["{model}", "--prompt-len", "0"], "--prompt-len 0"),
    (["{model}", "--batch-size", "0"], "--batch-sizes"),
    (["{model}", "--prompt-len", "200", "--decode-tokens", "100"], "positions"),
    (["{bert}"], "not a causal language model"),
])
def test_bad_input_is_one_line_exit_2(tiny_llama, tiny_bert, args, message):
    args = [a.format(model=tiny_llama, bert=tiny_bert) for a in args]
    result = run_cli("bench", *args, "--rounds", "1")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.slow  # compresses a model
def test_compress_bench_adds_the_figures_to_the_report(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("compress", tiny_llama, "--method", "svd", "--ratio", "0.4", "--skip-eval", "--bench", "--out", out,
                     "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    dense, small = report["bench"]["models"]
    assert (dense["model"], small["model"]) == (str(tiny_llama), str(out))  # named by --out, not the temp dir
    # the weights benched are the ones written: they differ by the parameters removed, 4 bytes each (fp32;
    # buffers such as rotary tables are the same in both)
    removed = report["params"]["model_before"] - report["params"]["model_after"]
    assert dense["weight_bytes"] - small["weight_bytes"] == 4 * removed > 0
    assert small["decode_ceiling"] == pytest.approx(dense["weight_bytes"] / small["weight_bytes"], rel=1e-12)
    assert "bench" in report["timings_s"]
    assert "## Inference speed" in (out / "report.md").read_text()
    assert json.loads(result.stdout)["bench"]["models"][1]["model"] == str(out)
