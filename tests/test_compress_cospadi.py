"""`subspace compress --method cospadi` end to end on tiny models: format, round trips, error paths."""

import json

import pytest
import torch

from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import DictionaryLinear
from subspace_cli.pipelines.compress import compress_and_write, run_compress
from subspace_cli.pipelines.compress_config import CompressConfig
from test_compress import TINY, cli

PROBE = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def _config(model, out, calib, **kw):
    return CompressConfig(model=str(model), out=str(out), calib=[str(calib)], method="cospadi", **{**TINY, **kw})


def _logits(model):
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize("options", [{}, {"group_size": 2}], ids=["per-layer", "grouped"])
def test_checkpoint_round_trips_through_both_loaders(tiny_llama, text_file, tmp_path, options):
    """The written checkpoint gives the in-memory model's logits (atol 1e-5, fp32), with and
    without subspace installed (trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    config = _config(tiny_llama, tmp_path / "out", text_file, ratio=0.3, options=options)
    report, model = compress_and_write(config)
    expected = _logits(model)
    loaded = load_model(config.out)
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    remote = AutoModelForCausalLM.from_pretrained(config.out, trust_remote_code=True)
    assert torch.allclose(_logits(remote), expected, atol=1e-5)
    dictionaries = [m for m in loaded.modules() if isinstance(m, DictionaryLinear)]
    assert dictionaries
    section = json.loads((tmp_path / "out" / "config.json").read_text())["subspace"]
    assert section["format_version"] == 2
    if options:
        shared = [spec for spec in section["modules"].values() if "dictionary_of" in spec]
        assert shared and all(spec["dictionary_of"] in section["modules"] for spec in shared)
        assert any(m.dictionary_of for m in report.matrices)


def test_report_accounts_positions_and_compares_with_svd_llm(tiny_llama, text_file, tmp_path):
    report = run_compress(_config(tiny_llama, tmp_path / "out", text_file, ratio=0.2, allocation="uniform"))
    fitted = [m for m in report.matrices if m.kind == "dictionary"]
    assert fitted
    for m in fitted:
        out_f, in_f = m.shape
        positions = min(2 * m.nonzeros * out_f, out_f * -(-m.atoms // 8)) / 2
        assert m.params_after == pytest.approx(m.atoms * in_f + m.nonzeros * out_f + positions, abs=1)
        assert m.params_after <= 0.8 * m.params_before + 1
        assert 0.0 <= m.whitened_rel_error < 1.0 and m.reference_rel_error is not None
    assert report.params.targeted_ratio_removed >= 0.2 - 1e-3
    assert report.timings_s["compress.update"] > 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "svd-llm at equal storage" in text and "k=" in text


def test_two_four_structure_reaches_the_checkpoint(tiny_llama, text_file, tmp_path):
    report, model = compress_and_write(_config(tiny_llama, tmp_path / "out", text_file, structure="2:4", ratio=0.2))
    modules = [m for m in model.modules() if isinstance(m, DictionaryLinear)]
    assert modules
    for m in modules:
        assert m.atoms % 4 == 0
        used = torch.zeros(m.out_features, m.atoms).scatter_(1, m.atom_indices().long(), 1.0)
        assert int(used.reshape(m.out_features, -1, 4).sum(-1).max()) <= 2


def test_dense_format_and_gpt2_conv1d(tiny_gpt2, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    report, model = compress_and_write(_config(tiny_gpt2, tmp_path / "dense", text_file, format="dense", ratio=0.3))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, DictionaryLinear) for m in plain.modules())
    assert any(m.kind == "dictionary" for m in report.matrices)
    assert torch.allclose(_logits(plain), _logits(model), atol=1e-5)


def test_unreachable_ratio_keeps_the_matrix_dense_and_says_so(tiny_llama, text_file, tmp_path):
    # k/s = 40 on 32-wide matrices: one nonzero per output needs 40 atoms, more than the rank.
    report = run_compress(_config(tiny_llama, tmp_path / "out", text_file, options={"k_over_s": 40}, skip_eval=True))
    assert all(m.kind == "dense" and m.params_after == m.params_before for m in report.matrices)
    assert any("unreachable" in note and "kept dense" in note for note in report.notes)


@pytest.mark.parametrize("args, message", [
    (["-O", "k_over_s=0.5"], "k_over_s"),
    (["-O", "k_over_s=100"], "k_over_s"),
    (["-O", "init=random"], "init"),
    (["--structure", "2:4", "--method", "svd-llm"], "--structure applies to sparse-dictionary methods"),
])
def test_bad_options_exit_2_and_write_nothing(tiny_llama, text_file, tmp_path, args, message):
    out = tmp_path / "out"
    argv = ["compress", tiny_llama, "--calib", text_file, "--out", out, "--method", "cospadi", *args]
    result = cli(*argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not out.exists()


def test_deterministic_with_parallel_group_fits(tiny_llama, text_file, tmp_path):
    """Groups are fitted on a thread pool; the checkpoint must not depend on scheduling."""
    for name in ("a", "b"):
        run_compress(_config(tiny_llama, tmp_path / name, text_file, skip_eval=True, options={"init": "columns"}))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
