"""compress on the vocabulary matrices (issue 16): the input embedding and the LM head are factored
only when --targets names them; a tied pair is factored once and stays tied."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from cli_runner import run_cli as _cli
from subspace_cli.modules.checkpoint import param_count
from subspace_cli.linalg.tall_svd import tall_decompose, tall_factors, tall_relative_error
from subspace_cli.linalg.truncation import Transform, decompose, factors, weighted_relative_error
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import LowRankEmbedding, LowRankLinear
from subspace_cli.pipelines.calibration import BlockStream, record_head_inputs
from subspace_cli.pipelines.compress import compress_and_write, run_compress
from subspace_cli.pipelines.compress_config import CompressConfig
from tiny_architectures import make_tiny_arch

TINY = dict(calib_samples=8, calib_seqlen=32, eval_seqlen=64, eval_chars=2000)
VOCAB_TARGETS = "lm_head|embed_tokens|layers"
PROBE = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_tiny_arch("qwen2", tmp_path_factory.mktemp("vocab") / "qwen2")  # untied


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return make_tiny_arch("gemma3", tmp_path_factory.mktemp("vocab") / "gemma3")  # tied, scaled embedding


def _config(model, out, calib, **kw):
    # uniform: at hidden 32 the global plan would keep the 128×32 vocabulary matrices dense
    return CompressConfig(model=str(model), out=str(out), calib=[str(calib)],
                          **{**TINY, "allocation": "uniform", "ratio": 0.3, "targets": VOCAB_TARGETS, **kw})


def _keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _round_trip(config):
    report, model = compress_and_write(config)
    with torch.no_grad():
        expected = model(PROBE).logits
        ours = load_model(config.out)
        remote = AutoModelForCausalLM.from_pretrained(config.out, trust_remote_code=True)
        assert torch.allclose(ours(PROBE).logits, expected, atol=1e-5)
        assert torch.allclose(remote(PROBE).logits, expected, atol=1e-5)
    assert param_count(ours) == report.params.model_after
    return report, ours, remote


def test_tied_embedding_factored_once_and_still_tied(tiny_llama, text_file, tmp_path):
    report, ours, remote = _round_trip(_config(tiny_llama, tmp_path / "out", text_file))
    for model in (ours, remote):
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert type(embedding).__name__ == "LowRankEmbedding" and type(head).__name__ == "TiedLowRankLinear"
        assert head._owner[0] is embedding  # the head reads the embedding's factors
    section = json.loads((tmp_path / "out" / "config.json").read_text())["subspace"]
    assert section["format_version"] == 4  # fused q/k/v and gate/up down factors
    assert section["modules"]["lm_head"] == {"kind": "tied_lowrank", "factors_of": "model.embed_tokens",
                                             "in_features": 32, "out_features": 128, "bias": False}
    assert not [k for k in _keys(tmp_path / "out") if k.startswith("lm_head")]  # stored once
    rows = [m for m in report.matrices if m.name in ("model.embed_tokens", "lm_head")]
    assert [m.name for m in rows] == ["model.embed_tokens"] and rows[0].shape == (128, 32)
    uniform = int(0.7 * 128 * 32 / 160)
    assert rows[0].rank == uniform - uniform % 8  # rounded down to --rank-multiple (auto: 8 on CPU)
    assert rows[0].params_after == rows[0].rank * 160
    assert any("tied matrix" in n for n in report.notes)


def test_untied_embedding_and_head_round_trip_and_accounting(qwen2, text_file, tmp_path):
    report, ours, _ = _round_trip(_config(qwen2, tmp_path / "out", text_file))
    assert isinstance(ours.model.embed_tokens, LowRankEmbedding) and isinstance(ours.lm_head, LowRankLinear)
    rows = {m.name: m for m in report.matrices}
    assert rows["model.embed_tokens"].shape == rows["lm_head"].shape == (128, 32)
    p = report.params
    assert p.targeted_before == sum(m.params_before for m in report.matrices)
    assert p.targeted_after == sum(m.params_after for m in report.matrices)
    assert p.model_before - p.model_after == p.targeted_before - p.targeted_after
    assert p.targeted_ratio_removed >= 0.3 - 0.02
    assert rows["lm_head"].whitened_rel_error < rows["model.embed_tokens"].whitened_rel_error  # final-hidden Gram used
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| model.embed_tokens | 128×32 |" in markdown and "| lm_head | 128×32 |" in markdown


def test_default_targets_leave_the_vocabulary_alone(qwen2, text_file, tmp_path):
    report = run_compress(_config(qwen2, tmp_path / "out", text_file, targets=None))
    assert not [m for m in report.matrices if "embed" in m.name or "lm_head" in m.name]
    section = json.loads((tmp_path / "out" / "config.json").read_text())["subspace"]
    kinds = {spec["kind"] for spec in section["modules"].values()}
    assert kinds == {"lowrank", "lowrank_group", "grouped_lowrank"} and section["format_version"] == 4
    with safe_open(str(qwen2 / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_scaled_tied_embedding_keeps_its_scale(gemma3, text_file, tmp_path):
    _, ours, _ = _round_trip(_config(gemma3, tmp_path / "out", text_file))
    assert ours.model.embed_tokens.scale == pytest.approx(32 ** 0.5)


def test_dense_format_restores_the_tie(tiny_llama, text_file, tmp_path):
    run_compress(_config(tiny_llama, tmp_path / "factored", text_file))
    run_compress(_config(tiny_llama, tmp_path / "dense", text_file, format="dense"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(dense(PROBE).logits, load_model(tmp_path / "factored")(PROBE).logits, atol=1e-5)


@pytest.mark.parametrize("extra, needle", [
    (["--targets", "lm_head|layers", "--exclude", "embed_tokens"], "one tied matrix"),
    (["--targets", "embed_tokens", "--method", "cospadi"], "sparse-dictionary methods do not factor"),
])
def test_selections_that_cannot_be_honoured_exit_2(tiny_llama, text_file, tmp_path, extra, needle):
    res = _cli("compress", tiny_llama, "--out", tmp_path / "o", "--calib", text_file, *extra)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["identity", "diagonal", "lower"])
def test_tall_svd_matches_the_full_svd(kind):
    """Σ, the rank-r product and its error through the [d, d] Gram equal the thin SVD's (rel. 1e-9)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g,
                                                                                 dtype=torch.float64)  # [V, d]
    matrix = {"identity": None, "diagonal": torch.rand(24, generator=g, dtype=torch.float64) + 0.5,
              "lower": torch.linalg.cholesky(torch.cov(torch.randn(24, 200, generator=g, dtype=torch.float64)))}[kind]
    transform = Transform(kind, matrix)
    full, tall = decompose(weight, transform), tall_decompose(weight, transform)
    assert torch.allclose(tall.s, full.s, rtol=1e-9)
    up, down = factors(full, 10)
    t_up, t_down = tall_factors(tall, 10)
    assert torch.allclose(t_up @ t_down, up @ down, rtol=1e-9, atol=1e-9 * float(full.s[0]))
    gram = torch.eye(24, dtype=torch.float64) * 2
    assert tall_relative_error(weight, t_up, t_down, gram) == pytest.approx(
        weighted_relative_error(weight, up @ down, gram), rel=1e-9)


def test_head_inputs_are_the_final_hidden_states(qwen2):
    """record_head_inputs gives the Gram of what lm_head receives in a real forward pass (rel. 1e-5)."""
    model = load_model(qwen2)
    ids = torch.randint(4, 128, (5, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    stream = BlockStream(model, ids, batch_size=2)
    for i in range(len(stream.blocks)):
        stream.advance(stream.run_block(i))
    stats = record_head_inputs(stream, ids, 2, model.lm_head)
    x = seen[0].double()
    assert stats.n_tokens == 5 * 16
    assert torch.allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-6 * float((x.T @ x).abs().max()))
