"""Inference-side forms of factored layers (issue 18): fused down factors (format 4) and the
cached forms of a dictionary layer. Each must compute what the plain form computes: the same
logits (fp32, atol 1e-5) in memory and through `trust_remote_code` with subspace_cli blocked from
import; training sees the same gradients; nothing about them is timed here (benchmarks/RESULTS.md).
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
from cli_runner import run_cli
from torch import nn

from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import (
    DictionaryLinear,
    GroupedLowRankLinear,
    LowRankGroup,
    LowRankLinear,
    densify_,
    dictionary_from_factors,
    factored_layout,
    fuse_shared_inputs,
    layout_format_version,
)
from subspace_cli.modules.remote_modeling import CacheBudget

ATOL = 1e-5
# Deterministic plans: no timing-based dense decisions, ranks as allocated.
PLAN = ["--dense-if-slower-below", "0", "--rank-multiple", "1", "--skip-eval", "--calib-samples", "4",
        "--calib-seqlen", "32", "--quiet"]


class Block(nn.Module):
    """q/k/v fed one tensor, as in an attention module."""

    def __init__(self, ranks=(5, 3, 3)):
        super().__init__()
        self.q_proj = LowRankLinear(16, 16, ranks[0], bias=True)
        self.k_proj = LowRankLinear(16, 8, ranks[1], bias=False)
        self.v_proj = LowRankLinear(16, 8, ranks[2], bias=False)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)


def _fused_pair(seed=0):
    torch.manual_seed(seed)
    plain = Block()
    fused = Block()
    fused.load_state_dict(plain.state_dict())
    path = fuse_shared_inputs(fused, ["q_proj", "k_proj", "v_proj"])
    return plain, fused, path


# ------------------------------------------------------------------------------- fused down factors

def test_fused_block_is_the_plain_block_forward_and_backward():
    plain, fused, path = _fused_pair()
    assert path == "fused_q_proj_k_proj_v_proj" and isinstance(fused.fused_q_proj_k_proj_v_proj, LowRankGroup)
    assert all(isinstance(getattr(fused, n), GroupedLowRankLinear) for n in ("q_proj", "k_proj", "v_proj"))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(fused(x), plain(x), atol=ATOL, rtol=0)
    # Gradients: each member's down rows of the stacked factor get that member's down gradient.
    plain(x).square().sum().backward()
    fused(x).square().sum().backward()
    stacked = torch.cat([plain.q_proj.down.weight.grad, plain.k_proj.down.weight.grad, plain.v_proj.down.weight.grad])
    torch.testing.assert_close(fused.fused_q_proj_k_proj_v_proj.down.weight.grad, stacked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.q_proj.up.weight.grad, plain.q_proj.up.weight.grad, atol=1e-5, rtol=1e-5)
    # Same parameter count: fusing moves tensors, it adds none.
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


def test_the_group_product_runs_once_per_input_and_never_goes_stale():
    _, fused, _ = _fused_pair()
    group = fused.fused_q_proj_k_proj_v_proj
    calls = []
    group.down.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 16)
    with torch.inference_mode():
        fused(x)
        assert len(calls) == 1  # one GEMM for the three members
        fused(x)  # the same tensor again: every member had read it, so it is computed afresh
        assert len(calls) == 2
        x2 = torch.randn(1, 3, 16)
        fused.q_proj(x2)
        fused.k_proj(torch.randn(1, 3, 16))  # another tensor: not the kept product
        assert len(calls) == 4
    y = torch.randn(1, 3, 16)
    fused.q_proj(y)
    y.mul_(2)  # changed in place between two members' calls: the kept product is not reused
    torch.testing.assert_close(fused.k_proj(y), fused.k_proj(y.clone()), atol=ATOL, rtol=0)


def test_fused_layout_is_format_4_and_densifies_back():
    plain, fused, _ = _fused_pair()
    layout = factored_layout(fused)
    assert layout_format_version(layout) == 4 and layout_format_version(factored_layout(plain)) == 1
    assert layout["fused_q_proj_k_proj_v_proj"] == {"kind": "lowrank_group", "in_features": 16, "ranks": [5, 3, 3],
                                                   "members": ["q_proj", "k_proj", "v_proj"]}
    assert layout["k_proj"] == {"kind": "grouped_lowrank", "rank": 3, "offset": 5, "bias": False,
                                "group": "fused_q_proj_k_proj_v_proj", "in_features": 16, "out_features": 8}


def test_a_lone_factored_layer_is_not_fused():
    torch.manual_seed(0)
    block = Block()
    block.k_proj = nn.Linear(16, 8)
    block.v_proj = nn.Linear(16, 8)
    assert fuse_shared_inputs(block, ["q_proj", "k_proj", "v_proj"]) is None
    assert isinstance(block.q_proj, LowRankLinear)


# ------------------------------------------------------------------------------- dictionary forms

def _dictionary(positions="bitmask", seed=0):
    torch.manual_seed(seed)
    atoms, nonzeros = 24, 6
    ids = torch.stack([torch.randperm(atoms)[:nonzeros] for _ in range(20)])
    layer = dictionary_from_factors(torch.randn(atoms, 16) / 4, torch.randn(20, nonzeros) / 4, ids,
                                    torch.randn(20), positions=positions)
    assert layer.representation == "packed"  # as compress builds it: the run keeps to its planned memory
    layer.representation = "auto"  # as a loaded checkpoint starts
    return layer


@pytest.mark.parametrize("positions", ["indices", "bitmask"])
def test_every_dictionary_form_computes_the_stored_product(positions):
    layer = _dictionary(positions)
    x = torch.randn(3, 7, 16)
    expected = layer(x).detach()  # gradients on: the stored (packed) product
    assert layer.chosen_form() == "auto"  # nothing chosen while training could read it
    with torch.no_grad():
        for form in ("packed", "csr", "dense_s", "dense_w", "auto"):
            layer.representation = form
            torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
            assert layer.chosen_form() in DictionaryLinear.FORMS
            assert layer.cache_bytes() == (0 if layer.chosen_form() == "packed"
                                           else layer.form_bytes(layer.chosen_form()))


def test_a_cached_form_follows_the_weights():
    layer = _dictionary()
    layer.representation = "dense_w"
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)
        layer.values.mul_(2)  # e.g. an optimizer step or load_state_dict
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), atol=ATOL, rtol=0)


def test_training_keeps_the_packed_product_and_its_gradients():
    layer = _dictionary()
    layer.representation = "dense_w"  # ignored while gradients flow to the code
    x = torch.randn(4, 16)
    layer(x).sum().backward()
    assert layer.values.grad is not None and layer.dictionary.grad is not None and layer.cache_bytes() == 0


def test_the_cache_budget_bounds_what_is_kept():
    layer = _dictionary()
    layer.cache_budget = CacheBudget(0)
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer.chosen_form() == "packed" and layer.cache_bytes() == 0
    shared = CacheBudget(layer.form_bytes("dense_w"))  # room for one dense W, not two
    first, second = _dictionary(seed=1), _dictionary(seed=2)
    for module in (first, second):
        module.cache_budget = shared
        module.representation = "auto"
    with torch.no_grad():
        first(torch.randn(2, 16))
        second(torch.randn(2, 16))
    assert first.cache_bytes() + second.cache_bytes() <= layer.form_bytes("dense_w")


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SUBSPACE_DICTIONARY_CACHE_MB", "0")
    assert not CacheBudget.from_environment().fits(1)
    monkeypatch.setenv("SUBSPACE_DICTIONARY_CACHE_MB", "1")
    assert CacheBudget.from_environment().fits(2**20) and not CacheBudget.from_environment().fits(2**20 + 1)
    monkeypatch.delenv("SUBSPACE_DICTIONARY_CACHE_MB")
    assert CacheBudget.from_environment().fits(2**40)


def test_a_form_name_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="'dense' is not one of"):
        _dictionary().representation = "dense"


# ------------------------------------------------------------------------------- written checkpoints

REMOTE = textwrap.dedent("""
    import importlib.abc, json, os, sys
    repo = sys.argv[1]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != repo]
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "subspace_cli":
                raise ImportError("subspace_cli is blocked in this test")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[3])
    out = {}
    for key, (path, form) in json.loads(sys.argv[2]).items():
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        kinds = set()
        for m in model.modules():
            kinds.add(type(m).__name__)
            if form and type(m).__name__ == "DictionaryLinear":
                m.representation = form
        with torch.no_grad():
            out[key] = {"logits": model(input_ids=ids).logits, "kinds": sorted(kinds)}
    torch.save(out, sys.argv[4])
""")


@pytest.mark.slow  # three compress runs and a Python without subspace_cli (about 10 s)
def test_fused_and_cached_forms_load_without_the_package(tiny_llama, text_file, tmp_path):
    outs = {}
    for name, extra in {"fused": ["--method", "svd-llm"], "unfused": ["--method", "svd-llm", "--no-fuse-projections"],
                        "dictionary": ["--method", "cospadi"]}.items():
        outs[name] = tmp_path / name
        result = run_cli("compress", tiny_llama, "--calib", text_file, "--out", outs[name], "--ratio", "0.3", *extra,
                         *PLAN)
        assert result.returncode == 0, result.stderr
    section = json.loads((outs["fused"] / "config.json").read_text())["subspace"]
    assert section["format_version"] == 4
    assert {s["kind"] for s in section["modules"].values()} >= {"lowrank_group", "grouped_lowrank"}
    assert json.loads((outs["unfused"] / "config.json").read_text())["subspace"]["format_version"] == 1
    jobs = {"fused": (str(outs["fused"]), None), "unfused": (str(outs["unfused"]), None)}
    jobs |= {f"dictionary/{form}": (str(outs["dictionary"]), form) for form in DictionaryLinear.FORMS + ("auto",)}
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(tmp_path / "remote.py"), repo, json.dumps(jobs), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "LowRankGroup" in got["fused"]["kinds"] and "LowRankGroup" not in got["unfused"]["kinds"]
    torch.testing.assert_close(got["fused"]["logits"], got["unfused"]["logits"], atol=ATOL, rtol=0)
    packed = got["dictionary/packed"]["logits"]
    for form in ("csr", "dense_s", "dense_w", "auto"):
        torch.testing.assert_close(got[f"dictionary/{form}"]["logits"], packed, atol=ATOL, rtol=0)
    # subspace's own loader and densify give the same logits again
    model = load_model(outs["fused"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, got["fused"]["logits"], atol=ATOL, rtol=0)
        densify_(model)
        assert not any(isinstance(m, (LowRankGroup, GroupedLowRankLinear)) for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, got["fused"]["logits"], atol=ATOL, rtol=0)
