"""compress on mixture-of-experts models (issue 16): each expert's slices of the 3-D expert parameters
factored with the Grams of the tokens routed to it, stored as LowRankExperts (format version 3)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from subspace_cli.walk import find_blocks, find_experts
from subspace_cli.linalg.gram import GramStats
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import LowRankExperts, LowRankLinear
from subspace_cli.pipelines.compress import compress_and_write, run_compress
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.expert_grams import expert_pass
from tiny_architectures import MOE, make_tiny_arch
from tiny_models import _save

TINY = dict(calib_samples=8, calib_seqlen=32, eval_seqlen=64, eval_chars=2000)
PROBE = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: make_tiny_arch(name, root / name) for name in MOE}


@pytest.fixture(scope="module")
def starved_mixtral(tmp_path_factory):
    """A tiny Mixtral whose routers never pick expert 3: coordinate 0 of every embedding row is 30,
    so the normalised hidden states keep a large positive coordinate 0, and each router's row for
    expert 3 is −10·e₀ (a logit near −50 against the others' ≈ 0)."""
    path = make_tiny_arch("mixtral", tmp_path_factory.mktemp("starved") / "src")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 30.0
        for layer in model.model.layers:
            layer.mlp.gate.weight[:, 0] = 0.0  # the other experts compete on the remaining coordinates
            layer.mlp.gate.weight[3].zero_()
            layer.mlp.gate.weight[3, 0] = -10.0
    return _save(model, path)


def _config(model, out, calib, **kw):
    return CompressConfig(model=str(model), out=str(out), calib=[str(calib)], **{**TINY, **kw})


def _tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _expert_rows(report):
    return [m for m in report.matrices if ".experts." in m.name]


@pytest.mark.parametrize("name", MOE)
def test_round_trip_both_loaders_and_untouched_tensors(moe_dirs, text_file, tmp_path, name):
    """Factored experts load with our loader and with remote code and give the in-memory logits
    (atol 1e-5, fp32); every tensor whose name survives (router, norms, embeddings, dense layers)
    is bitwise the source's, and experts left dense keep their exact slices."""
    config = _config(moe_dirs[name], tmp_path / "out", text_file)
    report, model = compress_and_write(config)
    section = json.loads((tmp_path / "out" / "config.json").read_text())["subspace"]
    assert section["format_version"] == 3
    kinds = {spec["kind"] for path, spec in section["modules"].items() if path.endswith("experts")}
    assert kinds == {"lowrank_experts"}
    with torch.no_grad():
        expected = model(PROBE).logits
        ours = load_model(config.out)
        remote = AutoModelForCausalLM.from_pretrained(config.out, trust_remote_code=True)
        assert torch.allclose(ours(PROBE).logits, expected, atol=1e-5)
        assert torch.allclose(remote(PROBE).logits, expected, atol=1e-5)
    assert any(isinstance(m, LowRankExperts) for m in ours.modules())

    before, after = _tensors(moe_dirs[name]), _tensors(tmp_path / "out")
    shared = set(before) & set(after)
    assert any(k.endswith("gate.weight") and "experts" not in k for k in shared)  # the routers survive
    assert [k for k in shared if not torch.equal(before[k], after[k])] == []

    source = AutoModelForCausalLM.from_pretrained(moe_dirs[name])
    dense_rows = [m for m in _expert_rows(report) if m.rank is None]
    for row in dense_rows:
        path, param, e = row.name.rsplit(".", 2)
        kept = ours.get_submodule(path).lowrank[param][int(e)]
        assert torch.equal(kept.weight, getattr(source.get_submodule(path), param)[int(e)])


@pytest.mark.parametrize("name", MOE)
def test_report_rows_per_expert_with_token_counts(moe_dirs, text_file, tmp_path, name):
    """One row per expert matrix with its rank and token count; per layer the counts sum to
    tokens × top-k; report.md has the experts section."""
    config = _config(moe_dirs[name], tmp_path / "out", text_file)
    report = run_compress(config)
    assert report.params.targeted_ratio_removed >= 0.2 - 0.02  # global allocation, experts counted like Linears
    rows = _expert_rows(report)
    experts = 4
    assert len(rows) == 2 * 2 * experts  # 2 layers × (gate_up, down) × 4 experts
    assert all(m.tokens is not None and m.gram == "routed" for m in rows)
    for layer in (0, 1):
        counts = [m.tokens for m in rows if f".layers.{layer}." in m.name and ".gate_up_proj." in m.name]
        assert sum(counts) == config.calib_samples * config.calib_seqlen * 2  # top-2 routing
    shapes = {m.name.rsplit(".", 2)[1]: m.shape for m in rows}
    assert shapes["gate_up_proj"][0] == 2 * shapes["down_proj"][1]  # [2I, H] and [H, I]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Experts" in markdown and "**model.layers.0.mlp.experts**" in markdown


def test_expert_without_tokens_falls_back_to_pooled_gram(starved_mixtral, text_file, tmp_path):
    report = run_compress(_config(starved_mixtral, tmp_path / "out", text_file, allocation="uniform"))
    starved = [m for m in _expert_rows(report) if m.name.endswith(".3")]
    assert len(starved) == 4 and all(m.tokens == 0 and m.gram == "pooled" for m in starved)
    # The rule, on every row: pooled exactly when the expert got fewer tokens than the matrix has inputs.
    assert all((m.gram == "pooled") == (m.tokens < m.shape[1]) for m in _expert_rows(report))
    assert any(m.gram == "routed" for m in _expert_rows(report))
    assert all(m.rank is not None and 0 <= m.whitened_rel_error < 1 for m in starved)  # fitted, and finite
    notes = [n for n in report.notes if "too few calibration tokens" in n]
    assert len(notes) == 2 and all("expert 3 (0 tokens: pooled Gram for both matrices)" in n for n in notes)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| 3 | 0 |" in markdown and "pooled" in markdown
    with torch.no_grad():
        assert torch.isfinite(load_model(tmp_path / "out")(PROBE).logits).all()


def test_targets_and_exclude_select_experts(moe_dirs, text_file, tmp_path):
    only_down = run_compress(_config(moe_dirs["mixtral"], tmp_path / "a", text_file, targets=r"experts\.down_proj"))
    assert {m.name.rsplit(".", 2)[1] for m in only_down.matrices} == {"down_proj"}
    assert len(only_down.matrices) == 8
    skip_three = run_compress(_config(moe_dirs["mixtral"], tmp_path / "b", text_file, allocation="uniform",
                                      exclude=r"experts\.(gate_up|down)_proj\.3$"))
    assert not [m for m in skip_three.matrices if m.name.endswith(".3")]
    source = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"])
    loaded = load_model(tmp_path / "b")
    for layer in range(2):
        path = f"model.layers.{layer}.mlp.experts"
        factored = loaded.get_submodule(path)
        for param in ("gate_up_proj", "down_proj"):
            assert isinstance(factored.lowrank[param][0], LowRankLinear)
            assert torch.equal(factored.lowrank[param][3].weight, getattr(source.get_submodule(path), param)[3])


def test_dense_format_densifies_experts(moe_dirs, text_file, tmp_path):
    """`--format dense` writes plain MixtralExperts whose logits are the factored checkpoint's."""
    run_compress(_config(moe_dirs["mixtral"], tmp_path / "factored", text_file))
    run_compress(_config(moe_dirs["mixtral"], tmp_path / "dense", text_file, format="dense"))
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "subspace" not in config and "auto_map" not in config
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(dense.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    with torch.no_grad():
        assert torch.allclose(dense(PROBE).logits, load_model(tmp_path / "factored")(PROBE).logits, atol=1e-5)


def test_pooled_option_and_allocation_count_experts(moe_dirs, text_file, tmp_path):
    """-O expert_grams=pooled fits every expert with pooled Grams; uniform allocation gives each expert
    matrix its floor((1 − ratio)·in·out/(in + out)) rank (to a multiple of 8), as any Linear."""
    report = run_compress(_config(moe_dirs["qwen2_moe"], tmp_path / "out", text_file, allocation="uniform",
                                  options={"expert_grams": "pooled"}))
    rows = _expert_rows(report)
    assert rows and all(m.gram == "pooled" for m in rows)
    assert any("expert_grams=pooled" in n for n in report.notes)
    for m in rows:
        out_f, in_f = m.shape
        uniform = int(0.8 * in_f * out_f / (in_f + out_f))
        assert m.rank == max(8, uniform - uniform % 8)  # rounded down to --rank-multiple (auto: 8 on CPU)
    assert report.params.targeted_before == sum(m.params_before for m in report.matrices)


def test_routed_grams_are_routing_weighted_sums(moe_dirs):
    """The hook's Gram for expert e is Σ_t w_te² x_t x_tᵀ over the tokens routed to e (rel. 1e-5: float32
    products summed in another row order)."""
    model = load_model(moe_dirs["mixtral"])
    blocks = find_blocks(model)
    experts = find_experts(blocks.modules[0], blocks.block_path(0))[0]
    captured = []
    handle = experts.module.register_forward_pre_hook(lambda m, args: captured.append(args))
    with expert_pass([experts], routed=True) as records, torch.no_grad():
        model(PROBE)
    handle.remove()
    x, index, weights = captured[0]
    for e in range(experts.num_experts):
        rows, slot = (index == e).nonzero(as_tuple=True)
        expected = GramStats(x.shape[1])
        expected.update(x[rows] * weights[rows, slot, None])
        got = records[0].routed[("gate_up_proj", e)]
        assert got.n_tokens == rows.numel() == int(records[0].counts[e])
        assert torch.allclose(got.gram, expected.gram, rtol=1e-5, atol=1e-7)


def test_sparse_dictionary_methods_leave_experts_with_a_note(moe_dirs, text_file, tmp_path):
    report = run_compress(_config(moe_dirs["mixtral"], tmp_path / "out", text_file, method="cospadi"))
    assert not _expert_rows(report)
    assert any("experts modules" in n and "copied unchanged" in n for n in report.notes)
