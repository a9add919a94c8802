"""Factored checkpoints: LowRankLinear, writing, both loaders (ours and remote code), atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from subspace_cli.errors import UsageError
from subspace_cli.modules.checkpoint import auto_class_for, param_count, write_checkpoint
from subspace_cli.io.output_dir import atomic_output_dir, check_output_dir
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import LowRankLinear, apply_factored_layout, densify_, factored_layout

REPO = Path(__file__).resolve().parents[1]
RANK = 4
ATOL = 1e-5  # fp32; measured 0.0 (same kernels, same weights)
AUTO = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModel"}


def _ids() -> torch.Tensor:
    return (torch.arange(24).reshape(2, 12) * 7 + 5) % 100 + 4  # (B=2, T=12), ids in [4, 104)


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _factor(model: nn.Module, rank: int = RANK) -> nn.Module:
    """Replace every Linear / Conv1D inside a numbered block by its rank-r truncated SVD."""
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, Conv1D)) or not any(p.isdigit() for p in path.split(".")):
            continue
        w = mod.weight.detach()
        w = w.T if isinstance(mod, Conv1D) else w  # Conv1D stores [in, out]; W is [out, in]
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        bias = mod.bias.detach() if mod.bias is not None else None
        lr = LowRankLinear.from_factors((u[:, :rank] * s[:rank]).float(), vh[:rank].float(), bias)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, lr)
    return model


def _tmp_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ----------------------------------------------------------------------------- LowRankLinear


def test_lowrank_linear_matches_dense_and_conv1d_orientation():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    lr = LowRankLinear.from_factors((u * s).float(), vh.float(), lin.bias.detach())  # full rank 7
    x = torch.randn(3, 5, 12)
    assert lr(x).shape == (3, 5, 7)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(lr.dense_weight(), lin.weight, atol=1e-5, rtol=0)
    assert (lr.in_features, lr.out_features, lr.rank) == (12, 7, 7)
    assert "rank=7" in repr(lr)

    conv = Conv1D(7, 12)  # weight [in=12, out=7], y = x W + b
    w = conv.weight.detach().T
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    lr = LowRankLinear.from_factors((u * s).float(), vh.float(), conv.bias.detach())
    torch.testing.assert_close(lr(x), conv(x), atol=1e-5, rtol=0)


def test_apply_layout_on_meta_and_unknown_kind():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8, bias=False))
    spec = {"kind": "lowrank", "rank": 2, "in_features": 16, "out_features": 8, "bias": False}
    apply_factored_layout(model, {"2": spec})
    assert isinstance(model[2], LowRankLinear) and model[2].up.weight.is_meta
    assert factored_layout(model) == {"2": spec}
    with pytest.raises(ValueError, match=r"'sparse'.*format version 4"):
        apply_factored_layout(model, {"0": {**spec, "kind": "sparse"}})
    with pytest.raises(ValueError, match="layout says"):
        apply_factored_layout(model, {"0": spec})  # (in, out) = (8, 16), not (16, 8)


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def factored(tiny_llama, tiny_gpt2, tiny_bert, tmp_path_factory):
    """name -> (in-memory factored model, its output on _ids(), written checkpoint dir)."""
    root = tmp_path_factory.mktemp("factored")
    cases = {}
    for name, src in (("llama", tiny_llama), ("gpt2", tiny_gpt2), ("bert", tiny_bert)):
        model = _factor(load_model(src))
        config_before = model.config.to_dict()
        with atomic_output_dir(root / name, overwrite=False) as tmp:
            write_checkpoint(model, tmp, source_dir=src, layout=factored_layout(model))
        assert model.config.to_dict() == config_before  # write_checkpoint leaves model.config alone
        cases[name] = (model, _output(model, _ids()), root / name)
    # The same llama, in many small shards.
    model = cases["llama"][0]
    write_checkpoint(model, root / "llama-sharded", source_dir=tiny_llama, max_shard_size="20KB")
    cases["llama-sharded"] = (model, cases["llama"][1], root / "llama-sharded")
    return cases


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

    import torch, transformers
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    built = []  # device of every dense module built while loading
    for cls in (nn.Linear, Conv1D):
        def wrap(init, cls=cls):
            def __init__(self, *a, **k):
                init(self, *a, **k)
                built.append(str(self.weight.device))
            return __init__
        cls.__init__ = wrap(cls.__init__)

    results = {"importable": importable}
    ids = (torch.arange(24).reshape(2, 12) * 7 + 5) % 100 + 4
    for name, path, auto in json.loads(sys.argv[2]):
        built.clear()
        model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(input_ids=ids)
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        layout = model.config.subspace["modules"]
        results[name] = {
            "output": out,
            "params": sum(p.numel() for p in model.parameters()),
            "types": sorted({type(model.get_submodule(p)).__name__ for p in layout}),
            "dense_keys": [k for k in model.state_dict() if k.rsplit(".", 1)[0] in layout],
            "built_off_meta": [d for d in built if d != "meta"],
            "n_built": len(built),
            "class": type(model).__name__,
        }
    torch.save(results, sys.argv[3])
""")


@pytest.fixture(scope="module")
def remote(factored, tmp_path_factory):
    """Load every factored checkpoint with Auto*.from_pretrained(trust_remote_code=True) in a
    Python where subspace_cli cannot be imported (one subprocess for all)."""
    tmp = tmp_path_factory.mktemp("remote")
    script = tmp / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    jobs = [(name, str(out), AUTO[name.split("-")[0]]) for name, (_, _, out) in factored.items()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO), json.dumps(jobs), str(tmp / "results.pt")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "results.pt", weights_only=True)


CASES = ["llama", "gpt2", "bert", "llama-sharded"]


@pytest.mark.parametrize("name", CASES)
def test_load_model_round_trip(name, factored, monkeypatch):
    model, expected, out = factored[name]
    built = []
    for cls in (nn.Linear, Conv1D):
        init = cls.__init__

        def __init__(self, *a, _init=init, **k):
            _init(self, *a, **k)
            built.append(self.weight.device.type)

        monkeypatch.setattr(cls, "__init__", __init__)
    loaded = load_model(out)
    monkeypatch.undo()

    assert built and set(built) == {"meta"}  # no dense module was ever allocated
    assert not loaded.training
    layout = factored_layout(model)
    assert factored_layout(loaded) == layout
    assert not [k for k in loaded.state_dict() if k.rsplit(".", 1)[0] in layout]
    torch.testing.assert_close(_output(loaded, _ids()), expected, atol=ATOL, rtol=0)
    assert param_count(loaded) == param_count(model)
    if name.startswith("llama"):  # tie_word_embeddings: lm_head stays dense and tied
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow
def test_remote_code_round_trip(name, factored, remote):
    model, expected, _ = factored[name]
    assert remote["importable"] is False
    got = remote[name]
    assert got["types"] == ["LowRankLinear"]
    assert got["dense_keys"] == []
    assert got["n_built"] > 0 and got["built_off_meta"] == []  # nothing dense was allocated
    assert got["class"].startswith("Subspace")
    torch.testing.assert_close(got["output"], expected, atol=ATOL, rtol=0)
    assert got["params"] == param_count(model)


def test_written_files(factored):
    _, _, out = factored["llama"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_subspace.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_subspace.SubspaceLlamaForCausalLM"}
    section = config["subspace"]
    assert (section["format_version"], section["kind"], section["base_architecture"]) == (
        1, "factored", "LlamaForCausalLM")
    assert section["modules"]["model.layers.0.self_attn.q_proj"] == {
        "kind": "lowrank", "rank": RANK, "in_features": 32, "out_features": 32, "bias": False}
    assert "import subspace_cli" not in (out / "modeling_subspace.py").read_text()
    sharded = factored["llama-sharded"][2]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert auto_class_for("GPT2LMHeadModel") == "AutoModelForCausalLM"
    assert auto_class_for("BertModel") == "AutoModel"


def test_write_is_deterministic(factored, tmp_path):
    model, _, out = factored["gpt2"]
    write_checkpoint(model, tmp_path / "again", source_dir=None)
    for name in ("model.safetensors", "config.json", "modeling_subspace.py"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_layout_must_match_model(factored, tmp_path):
    model, _, _ = factored["bert"]
    layout = factored_layout(model)
    layout.popitem()
    with pytest.raises(ValueError, match="layout does not describe"):
        write_checkpoint(model, tmp_path / "x", source_dir=None, layout=layout)


def test_dense_format_loads_without_remote_code(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _factor(load_model(tiny_gpt2))
    expected = _output(model, _ids())
    densify_(model)
    assert not factored_layout(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    write_checkpoint(model, tmp_path / "dense", source_dir=tiny_gpt2, layout=None)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "subspace" not in config and "auto_map" not in config
    assert not (tmp_path / "dense" / "modeling_subspace.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(_output(plain, _ids()), expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- bad input


def test_corrupt_safetensors_is_usage_error(factored, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(factored["llama"][2], bad)
    weights = bad / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(UsageError, match="model.safetensors"):
        load_model(bad)


def test_missing_files_and_pickle_are_usage_errors(factored, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="config.json"):
        load_model(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((factored["llama"][2] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(UsageError, match="--allow-pickle"):
        load_model(pickled)


def test_shape_mismatch_is_usage_error(factored, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(factored["llama"][2], bad)
    config = json.loads((bad / "config.json").read_text())
    config["subspace"]["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = RANK + 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="do not match"):
        load_model(bad)


def test_newer_format_version_is_usage_error(factored, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(factored["llama"][2], bad)
    config = json.loads((bad / "config.json").read_text())
    config["subspace"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="format version 99"):
        load_model(bad)


# ----------------------------------------------------------------------------- atomic output


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_non_empty_out_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UsageError, match="'.*out' is not empty; pass --overwrite or choose another --out"):
        check_output_dir(out, overwrite=False)
    ran = False
    with pytest.raises(UsageError, match="not empty"):
        with atomic_output_dir(out, overwrite=False):
            ran = True
    assert not ran
    assert _snapshot(out) == {"keep.txt": b"old"} and _tmp_siblings(out) == []
    check_output_dir(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty", overwrite=False) as tmp:
        (tmp / "a").write_text("new")
    assert _snapshot(tmp_path / "empty") == {"a": b"new"}


def test_exception_leaves_out_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-")
            (tmp / "half.safetensors").write_text("half")
            raise RuntimeError("boom")
    assert _snapshot(out) == {"keep.txt": b"old"} and _tmp_siblings(out) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "fresh", overwrite=False):
            raise KeyboardInterrupt
    assert not (tmp_path / "fresh").exists() and _tmp_siblings(tmp_path / "fresh") == []


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic_output_dir(out, overwrite=False) as tmp:  # parents are created
        (tmp / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _snapshot(out) == {"new.txt": b"new"} and _tmp_siblings(out) == []
