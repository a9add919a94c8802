"""Perplexity, drift, gates and the `subspace eval` command on tiny models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from subspace_cli.errors import GateFailed, UsageError
from subspace_cli.evaluate.drift import embedding_similarity, mean_token_kl, score_windows
from subspace_cli.evaluate.gates import check_gates, parse_condition, raise_if_failed
from subspace_cli.evaluate.perplexity import is_causal_lm, perplexity


def _load(path):
    from subspace_cli.modules.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(str(path), with_tokenizer=False).model


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return _load(tiny_llama)


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, 128, (5, 24), generator=generator)  # [n, L]


def _perturbed(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        weight = other.model.layers[0].mlp.down_proj.weight
        weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    return other


# ------------------------------------------------------------------------------ perplexity


def test_perplexity_is_exp_of_mean_cross_entropy(llama, windows):
    with torch.no_grad():
        logits = llama(input_ids=windows).logits  # [n, L, V]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1))
    result = perplexity(llama, windows, batch_size=2)  # 3 uneven batches
    assert result["n_tokens"] == 5 * 23
    assert result["nll"] == pytest.approx(float(ce), rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-6)


def test_kl_of_model_with_itself_is_zero(llama, windows):
    assert abs(mean_token_kl(llama, llama, windows, batch_size=2)) < 1e-7


def test_kl_after_perturbation_matches_direct_computation(llama, windows):
    other = _perturbed(llama)
    kl = mean_token_kl(other, llama, windows, batch_size=3)
    with torch.no_grad():
        lp = F.log_softmax(other(input_ids=windows).logits[:, :-1].double(), -1)
        lp_base = F.log_softmax(llama(input_ids=windows).logits[:, :-1].double(), -1)
    direct = float((lp_base.exp() * (lp_base - lp)).sum(-1).mean())
    assert kl > 1e-4
    assert kl == pytest.approx(direct, rel=1e-4)  # fp32 log_softmax vs float64 reference


def test_score_windows_one_pass(llama, windows):
    other = _perturbed(llama)
    scores = score_windows(other, windows, baseline=llama, batch_size=4)
    assert scores["ppl"] == pytest.approx(perplexity(other, windows)["ppl"], rel=1e-9)
    assert scores["baseline_ppl"] == pytest.approx(perplexity(llama, windows)["ppl"], rel=1e-9)
    assert scores["ppl_ratio"] == pytest.approx(scores["ppl"] / scores["baseline_ppl"], rel=1e-9)


def test_causal_detection(tiny_llama, tiny_gpt2, tiny_bert):
    assert is_causal_lm(_load(tiny_llama)) and is_causal_lm(_load(tiny_gpt2))
    assert not is_causal_lm(_load(tiny_bert))


def test_embedding_similarity(tiny_bert, windows):
    bert = _load(tiny_bert)
    assert embedding_similarity(bert, bert, windows) == pytest.approx(1.0, abs=1e-6)
    other = copy.deepcopy(bert)
    with torch.no_grad():
        weight = other.encoder.layer[-1].output.dense.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    sim = embedding_similarity(other, bert, windows, batch_size=2)
    with torch.no_grad():
        direct = F.cosine_similarity(other(input_ids=windows).last_hidden_state.double(),
                                     bert(input_ids=windows).last_hidden_state.double(), dim=-1).mean()
    assert 0.0 < sim < 0.99
    assert sim == pytest.approx(float(direct), rel=1e-5)
    with pytest.raises(UsageError, match="--baseline"):
        score_windows(bert, windows)


# ----------------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    "text, field, op, threshold",
    [("ppl_ratio>1.5", "ppl_ratio", ">", 1.5), (" kl >= 0.05 ", "kl", ">=", 0.05), ("ppl<30", "ppl", "<", 30.0),
     ("x<=1e-3", "x", "<=", 1e-3), ("n_tokens == 10", "n_tokens", "==", 10.0), ("a!=-2", "a", "!=", -2.0)],
)
def test_parse_condition(text, field, op, threshold):
    cond = parse_condition(text)
    assert (cond.field, cond.op, cond.threshold) == (field, op, threshold)


@pytest.mark.parametrize("text", ["ppl", "ppl>", ">3", "ppl=3", "ppl>>1", "ppl>abc", "ppl>nan", "1x>2"])
def test_parse_condition_rejects(text):
    with pytest.raises(UsageError, match="--fail-if"):
        parse_condition(text)


def test_check_gates():
    values = {"ppl": 12.0, "kl": 0.1, "ppl_ratio": 1.2, "metric": "perplexity", "nan": float("nan")}
    results = check_gates(["ppl_ratio>1.5", "kl>=0.05", "ppl<30", "ppl==12", "nan<0"], values)
    assert [r.failed for r in results] == [False, True, True, True, True]  # NaN always fails
    assert results[1].value == 0.1 and results[1].threshold == 0.05
    with pytest.raises(UsageError, match=r"unknown field 'bogus'.*kl, nan, ppl, ppl_ratio"):
        check_gates(["bogus>1"], values)
    with pytest.raises(UsageError, match="unknown field 'metric'"):  # strings are not gateable
        check_gates(["metric>1"], values)


def test_raise_if_failed_lists_every_failure():
    results = check_gates(["a>1", "b>1", "c>1"], {"a": 2, "b": 0, "c": 3})
    with pytest.raises(GateFailed) as info:
        raise_if_failed(results, summary={"a": 2})
    assert [f["condition"] for f in info.value.failed] == ["a>1", "c>1"]
    assert "a>1" in str(info.value) and "c>1" in str(info.value)
    assert info.value.summary == {"a": 2}
    raise_if_failed(check_gates(["a>5"], {"a": 2}))  # nothing failed: no exception


# ------------------------------------------------------------------------------------- CLI


def _invoke(*args):
    from subspace_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_against_itself_passes(tiny_llama, text_file):
    result = _invoke("eval", tiny_llama, "--data", text_file, "--baseline", tiny_llama,
                     "--fail-if", "ppl_ratio>1.5", "--eval-seqlen", 64, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["split"] == "heldout"
    assert out["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert abs(out["kl"]) < 1e-7
    assert out["n_tokens"] == out["n_windows"] * 63 and out["n_windows"] >= 1
    assert out["gates"] == [{"condition": "ppl_ratio>1.5", "field": "ppl_ratio", "op": ">", "threshold": 1.5,
                             "value": out["ppl_ratio"], "failed": False}]


def test_eval_failing_gate_exits_1_with_json(tiny_llama, text_file):
    result = _invoke("eval", tiny_llama, "--data", text_file, "--fail-if", "ppl<1", "--fail-if", "nll>1e9",
                     "--fail-if", "ppl>1", "--split", "all", "--eval-chars", 2000, "--eval-seqlen", 64, "--json")
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["exit_code"] == 1
    assert [g["failed"] for g in out["gates"]] == [False, False, True]
    assert [f["condition"] for f in out["failed"]] == ["ppl>1"]
    assert out["ppl"] > 1 and out["split"] == "all"
    assert "ppl>1" in result.stderr


def test_eval_bad_input_exits_2_with_one_line(tiny_llama, text_file, tmp_path):
    cases = [
        ("eval", tmp_path / "missing", "--data", text_file),
        ("eval", tiny_llama, "--data", tmp_path / "missing.txt"),
        ("eval", tiny_llama, "--data", text_file, "--fail-if", "kl>0.1"),  # kl needs --baseline
        ("eval", tiny_llama, "--data", text_file, "--fail-if", "bogus>1"),
        ("eval", tiny_llama, "--data", text_file, "--split", "train"),
    ]
    for args in cases:
        result = _invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_encoder_reports_embedding_similarity(tiny_bert, text_file):
    result = _invoke("eval", tiny_bert, "--data", text_file, "--baseline", tiny_bert, "--eval-seqlen", 64,
                     "--fail-if", "embedding_similarity<0.99", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metric"] == "embedding_similarity" and "ppl" not in out
    assert out["embedding_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert "no language-model head" in out["note"]
    assert _invoke("eval", tiny_bert, "--data", text_file).exit_code == 2
