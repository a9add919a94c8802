"""The verb matrix (issue 16), read-side and compress: on every dense architecture of
tiny_architectures.py, svd-llm and cospadi (sequential, 20%) write a factored checkpoint that loads
with `subspace_cli.load_model` and, with subspace_cli blocked from import, with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`, and gives the in-memory
model's logits (atol 1e-5); `--format dense` loads in plain transformers. `inspect` and `eval` run and
report on every architecture, MoE included. And a model whose layers cannot be found exits 2,
listing what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from matrix_helpers import (  # noqa: F401 - one_thread is a fixture
    ARCHITECTURES,
    DENSE,
    SEQLEN,
    arch_dir,
    logits,
    one_thread,
    probe_ids,
    texts,
)
from torch import nn
from typer.testing import CliRunner

from subspace_cli.errors import UsageError
from subspace_cli.modules.checkpoint import param_count
from subspace_cli.walk import block_linears, find_blocks
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import LowRankLinear
from subspace_cli.pipelines.compress import compress_and_write
from subspace_cli.pipelines.compress_config import CompressConfig

ATOL = 1e-5  # fp32, same weights and kernels: measured 0.0 on every architecture
METHODS = ["svd-llm", "cospadi"]
CASES = [(name, method) for name in DENSE for method in METHODS]
RATIO = 0.2

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every family: the slow tier


def _invoke(*args):
    from subspace_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _compress(tmp_path_factory, name: str, method: str, out: Path, **kw):
    calib, _ = texts(tmp_path_factory)
    config = CompressConfig(model=str(arch_dir(tmp_path_factory, name)), out=str(out), calib=[str(calib)],
                            method=method, ratio=RATIO, calib_samples=4, calib_seqlen=SEQLEN, eval_seqlen=SEQLEN,
                            eval_chars=400, **kw)
    return compress_and_write(config)


def _check_params(loaded_params: int, report, method: str) -> None:
    if method == "cospadi":  # the packed positions are buffers: counted in the report, not as parameters
        assert loaded_params < report.params.model_after < report.params.model_before
    else:
        assert loaded_params == report.params.model_after


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(name, method) -> (out dir, report, in-memory logits on probe_ids()), each compressed on first use."""
    root = tmp_path_factory.mktemp("matrix-compress")
    done: dict = {}

    def get(name: str, method: str):
        if (name, method) not in done:
            try:
                out = root / f"{name}-{method}"
                report, model = _compress(tmp_path_factory, name, method, out)
                done[name, method] = (out, report, logits(model, probe_ids()))
            except Exception as exc:  # noqa: BLE001 - re-raised in every test that asks for this case
                done[name, method] = exc
        if isinstance(done[name, method], Exception):
            raise done[name, method]
        return done[name, method]

    return get


@pytest.mark.parametrize("name, method", CASES)
def test_factored_checkpoint_loads_with_the_in_memory_logits(compressed, tmp_path_factory, name, method):
    from transformers import AutoModelForCausalLM

    out, report, expected = compressed(name, method)
    original = load_model(arch_dir(tmp_path_factory, name))
    blocks = find_blocks(original)
    linears = {path for i, block in enumerate(blocks.modules) for path in block_linears(block, blocks.block_path(i))}
    assert {m.name for m in report.matrices} == linears  # every Linear of every block, fused ones as one matrix
    assert report.params.targeted_ratio_removed >= RATIO - 0.03, report.params  # rank granularity of 32-wide matrices
    config = json.loads((out / "config.json").read_text())
    assert config["subspace"]["base_architecture"] == ARCHITECTURES[name][1]
    modules = config["subspace"]["modules"]
    groups = {path for path, spec in modules.items() if spec["kind"] == "lowrank_group"}  # fused down factors
    assert set(modules) - groups <= linears and modules
    assert all(set(modules[g]["members"]) <= linears and len(modules[g]["members"]) >= 2 for g in groups)
    loaded = load_model(out)
    assert not any(isinstance(m, nn.Linear) and n in config["subspace"]["modules"] for n, m in loaded.named_modules())
    torch.testing.assert_close(logits(loaded, probe_ids()), expected, atol=ATOL, rtol=0)
    _check_params(param_count(loaded), report, method)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()  # the modeling file written beside it
    assert type(remote).__name__ == f"Subspace{ARCHITECTURES[name][1]}"
    torch.testing.assert_close(logits(remote, probe_ids()), expected, atol=ATOL, rtol=0)
    for name_, ppl in report.perplexity.items():
        assert 1.0 < ppl.before < 1e4 and 1.0 < ppl.after < 1e4, (name_, ppl)


REMOTE_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, os, sys
    repo = sys.argv[1]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != repo]
    class Block(importlib.abc.MetaPathFinder):  # an editable install would still find it
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "subspace_cli":
                raise ImportError("subspace_cli is blocked in this test")
    sys.meta_path.insert(0, Block())
    try:
        import subspace_cli
        importable = True
    except ImportError:
        importable = False
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.load(sys.argv[3])
    results = {"importable": importable}
    for key, path in json.loads(sys.argv[2]).items():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                out = model(input_ids=ids).logits
            results[key] = {"logits": out, "class": type(model).__name__,
                            "params": sum(p.numel() for p in model.parameters())}
        except Exception as exc:
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, sys.argv[4])
""")


@pytest.fixture(scope="module")
def remote(compressed, tmp_path_factory):
    """Every factored checkpoint loaded by plain transformers with remote code, in one Python where
    subspace_cli cannot be imported."""
    tmp = tmp_path_factory.mktemp("matrix-remote")
    jobs = {}
    for name, method in CASES:
        try:
            jobs[f"{name}/{method}"] = str(compressed(name, method)[0])
        except Exception:  # noqa: BLE001, S112 - that case fails in its own round-trip test
            continue
    (tmp / "load.py").write_text(REMOTE_SCRIPT)
    torch.save(probe_ids(), tmp / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(tmp / "load.py"), repo, json.dumps(jobs), str(tmp / "ids.pt"),
                           str(tmp / "results.pt")], cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "results.pt", weights_only=True)


@pytest.mark.parametrize("name, method", CASES)
def test_factored_checkpoint_loads_without_the_package(compressed, remote, name, method):
    _, report, expected = compressed(name, method)
    assert remote["importable"] is False
    got = remote[f"{name}/{method}"]
    assert "error" not in got, got.get("error")
    assert got["class"] == f"Subspace{ARCHITECTURES[name][1]}"
    torch.testing.assert_close(got["logits"], expected, atol=ATOL, rtol=0)
    _check_params(got["params"], report, method)


@pytest.mark.parametrize("name", DENSE)
def test_dense_format_loads_in_plain_transformers(compressed, tmp_path_factory, tmp_path, name):
    """`--format dense` writes plain Linears with the factored model's function: the same logits as
    the in-memory model, and as the factored checkpoint of the same run (fp32 reassociation only)."""
    from transformers import AutoModelForCausalLM

    report, model = _compress(tmp_path_factory, name, "svd-llm", tmp_path / "dense", format="dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "subspace" not in config and "auto_map" not in config
    assert not (tmp_path / "dense" / "modeling_subspace.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    dense_logits = logits(plain, probe_ids())
    torch.testing.assert_close(dense_logits, logits(model, probe_ids()), atol=ATOL, rtol=0)
    _, factored_report, factored_logits = compressed(name, "svd-llm")
    assert [m.rank for m in report.matrices] == [m.rank for m in factored_report.matrices]
    torch.testing.assert_close(dense_logits, factored_logits, atol=1e-4, rtol=0)  # W = U·V in fp32 against U·(V·x)


# ----------------------------------------------------------------------------- inspect and eval


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_inspect_reports_every_block_matrix(tmp_path_factory, name):
    model_dir = arch_dir(tmp_path_factory, name)
    calib, _ = texts(tmp_path_factory)
    result = _invoke("inspect", model_dir, "--calib", calib, "--calib-samples", 2, "--calib-seqlen", SEQLEN, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["matrices"]
    blocks = find_blocks(load_model(model_dir))
    linears = {path for i, block in enumerate(blocks.modules) for path in block_linears(block, blocks.block_path(i))}
    assert linears <= {r["name"] for r in rows}  # MoE: expert matrices may come on top
    assert out["summary"]["n_matrices"] == len(rows)
    for r in rows:
        assert r["max_rank"] == min(r["shape"])
        assert 1.0 <= r["effective_rank"] <= r["max_rank"]
        assert 1 <= r["rank_90"] <= r["rank_99"] <= r["max_rank"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_eval_against_itself_is_the_identity(tmp_path_factory, name):
    """A model scored against itself as baseline: ppl_ratio 1 and KL 0 (up to fp32 rounding)."""
    model_dir = arch_dir(tmp_path_factory, name)
    data, _ = texts(tmp_path_factory)
    result = _invoke("eval", model_dir, "--data", data, "--baseline", model_dir, "--eval-seqlen", SEQLEN,
                     "--eval-chars", 400, "--fail-if", "ppl_ratio>1.000001", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is True and 1.0 < out["ppl"] < 1e4 and out["n_tokens"] > 0
    assert out["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert abs(out["kl"]) <= 1e-6


@pytest.mark.parametrize("name", DENSE)
def test_eval_scores_the_factored_checkpoint(compressed, tmp_path_factory, name):
    """eval loads the factored checkpoint without remote code and measures its drift from the dense model."""
    out_dir, _, _ = compressed(name, "svd-llm")
    data, _ = texts(tmp_path_factory)
    result = _invoke("eval", out_dir, "--data", data, "--baseline", arch_dir(tmp_path_factory, name),
                     "--eval-seqlen", SEQLEN, "--eval-chars", 400, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert 1.0 < out["ppl"] < 1e4 and out["kl"] > 0 and out["ppl_ratio"] > 0


# ----------------------------------------------------------------------------- bad input


class _ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)


class _LinearBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _NoBlocks(nn.Module):
    """Layers a transformer-shaped search cannot use: a ModuleList of conv blocks (no Linear), a
    ModuleList of mixed classes, an empty one, and Linears outside any list."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.stages = nn.ModuleList([_ConvBlock(), _ConvBlock()])
        self.mixed = nn.ModuleList([_LinearBlock(), nn.Linear(4, 4)])
        self.extra = nn.ModuleList()
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def test_find_blocks_lists_the_module_types_it_saw():
    """Before: 'found no repeated blocks with Linear layers in _NoBlocks' and nothing about what was there."""
    with pytest.raises(UsageError) as info:
        find_blocks(_NoBlocks())
    message = str(info.value)
    assert "\n" not in message and message.startswith("found no repeated blocks with Linear layers in _NoBlocks")
    assert "stages = 2 × _ConvBlock (no Linear)" in message
    assert "mixed = 2 × Linear/_LinearBlock (mixed classes)" in message
    assert "extra = 0 × - (empty)" in message
    assert "embed: Embedding" in message and "head: Sequential" in message
    with pytest.raises(UsageError, match=r"ModuleLists: none; children: 0: Linear, 1: ReLU\)"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_cli_exits_2_on_a_checkpoint_without_linear_blocks(tmp_path):
    """A transformers ResNet: its stages are a ModuleList of convolution blocks, with no Linear."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic")).save_pretrained(
        tmp_path / "resnet")
    result = _invoke("inspect", tmp_path / "resnet")
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: found no repeated blocks with Linear layers in ResNetModel"), result.stderr
    assert "encoder.stages = 2 × ResNetStage (no Linear)" in error and "embedder: ResNetEmbeddings" in error
