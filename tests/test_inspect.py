"""Spectral summaries and the `subspace inspect` command on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from subspace_cli.linalg.spectra import effective_rank, normalised_spectrum, rank_for_energy


def _invoke(*args):
    from subspace_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("n", [1, 5, 64])
def test_effective_rank_of_flat_spectrum_is_n(n):
    assert effective_rank(torch.ones(n)) == pytest.approx(n, rel=1e-12)
    assert effective_rank(3.7 * torch.ones(n)) == pytest.approx(n, rel=1e-12)  # scale-free


def test_effective_rank_examples():
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, erank = 2^1.5
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2 ** 1.5, rel=1e-12)
    assert effective_rank(torch.zeros(4)) == 0.0


def test_rank_for_energy_examples():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 9/14, 13/14, 1
    assert [rank_for_energy(s, f) for f in (0.0, 0.5, 9 / 14, 0.65, 0.9, 13 / 14, 0.95, 1.0)] == [0, 1, 1, 2, 2, 2, 3, 3]
    s = torch.linspace(1, 0.01, 100)
    for f in (0.3, 0.9, 0.99):
        r = rank_for_energy(s, f)
        e = s.double().square()
        assert e[:r].sum() >= f * e.sum() * (1 - 1e-12) and e[: r - 1].sum() < f * e.sum()
    assert rank_for_energy(torch.zeros(3), 0.9) == 0
    with pytest.raises(ValueError):
        rank_for_energy(s, 1.5)


def test_normalised_spectrum():
    assert normalised_spectrum(torch.tensor([4.0, 2.0, 1.0])).tolist() == [1.0, 0.5, 0.25]


# ------------------------------------------------------------------------------------- CLI


def _check_rows(rows):
    for row in rows:
        out_f, in_f = row["shape"]
        assert row["max_rank"] == min(out_f, in_f)
        assert row["break_even_rank"] == math.ceil(out_f * in_f / (out_f + in_f))
        assert 1.0 <= row["effective_rank"] <= row["max_rank"]
        assert 1 <= row["rank_90"] <= row["rank_99"] <= row["max_rank"]
        # Random init: a near-flat spectrum, so 99% of the energy needs most directions.
        assert row["rank_99"] >= 0.5 * row["max_rank"]


def test_inspect_llama_json(tiny_llama):
    result = _invoke("inspect", tiny_llama, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["matrices"]
    assert len(rows) == 7 * 2 and out["summary"]["n_matrices"] == 14
    assert len({r["name"] for r in rows}) == 14
    assert {r["kind"] for r in rows} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    by_kind = {r["kind"]: r for r in rows if r["block"] == 0}
    assert by_kind["self_attn.k_proj"]["shape"] == [16, 32] and by_kind["mlp.down_proj"]["shape"] == [32, 64]
    _check_rows(rows)
    assert out["calibration"] is None and "whitened_rank_90" not in rows[0]
    assert out["summary"]["params"] == sum(r["params"] for r in rows)


@pytest.mark.parametrize("which, n_matrices, kind, shape", [
    ("gpt2", 4 * 2, "attn.c_attn", [96, 32]),  # Conv1D read as [out, in]
    ("bert", 6 * 2, "attention.self.query", [32, 32]),
])
def test_inspect_gpt2_and_bert(which, n_matrices, kind, shape, tiny_gpt2, tiny_bert, text_file):
    path = {"gpt2": tiny_gpt2, "bert": tiny_bert}[which]
    result = _invoke("inspect", path, "--calib", text_file, "--calib-samples", 2, "--calib-seqlen", 32, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["matrices"]
    assert len(rows) == n_matrices
    assert next(r for r in rows if r["kind"] == kind)["shape"] == shape
    _check_rows(rows)
    assert all(1 <= r["whitened_rank_90"] <= r["whitened_rank_99"] <= r["max_rank"] for r in rows)


def test_inspect_plot_and_whitened(tiny_llama, text_file, tmp_path):
    plot = tmp_path / "spectra.png"
    result = _invoke("inspect", tiny_llama, "--calib", text_file, "--calib-samples", 4, "--calib-seqlen", 32,
                     "--targets", r"mlp\.", "--plot", plot, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    rows = out["matrices"]
    assert len(rows) == 3 * 2 and all(r["kind"].startswith("mlp.") for r in rows)
    assert out["calibration"] == {"data": str(text_file), "samples": 4, "seqlen": 32, "seed": 0}
    for r in rows:
        assert 1.0 <= r["whitened_effective_rank"] <= r["max_rank"]
    assert "whitened_params_fraction_at_99" in out["summary"]


def test_inspect_human_output(tiny_llama):
    result = _invoke("inspect", tiny_llama, "--exclude", "mlp")
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.stdout and "down_proj" not in result.stdout


def test_inspect_bad_input_exits_2(tiny_llama, tmp_path):
    cases = [
        ("inspect", tmp_path / "missing"),
        ("inspect", tiny_llama, "--plot", tmp_path / "no" / "such" / "dir.png"),
        ("inspect", tiny_llama, "--plot", tmp_path / "spectra.txt"),
        ("inspect", tiny_llama, "--targets", "("),
        ("inspect", tiny_llama, "--targets", "nothing-matches"),
    ]
    for args in cases:
        result = _invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        # One error line (transformers' own "Loading weights" bar may precede it once loaded).
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.stderr
        assert result.stdout == ""


def test_singular_values_any_orientation():
    from subspace_cli.linalg.spectra import singular_values

    m = torch.randn(7, 19, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(singular_values(m), torch.linalg.svdvals(m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(singular_values(m.T), torch.linalg.svdvals(m), rtol=1e-12, atol=1e-12)
