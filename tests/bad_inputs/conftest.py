"""Session-wide inputs of the bad-input sweep, built once: tiny models, broken variants that need
torch to make, a factored (compressed) checkpoint, a LoRA adapter and a resumable adapt checkpoint.

Each case copies what it needs into its own temporary root (`bad_ctx`), which is also its cwd.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bad_input_harness import TINY, Ctx  # noqa: E402


def _cli(argv: list[str]) -> None:
    from cli_runner import run_cli

    result = run_cli(*argv)
    assert result.returncode == 0, f"fixture run failed: subspace {' '.join(map(str, argv))}\n{result.stderr}"


def _rewrite_weights(src: Path, dest: Path, edit) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors, torch)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _first(tensors: dict, fragment: str) -> str:
    return next(name for name in sorted(tensors) if fragment in name)


def _set_nan(tensors, torch):
    name = _first(tensors, "layers.0.self_attn.q_proj.weight")
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")


def _set_inf(tensors, torch):
    name = _first(tensors, "layers.1.mlp.up_proj.weight")
    tensors[name] = torch.full_like(tensors[name], float("inf"))


def _pickle_only(src: Path, dest: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dest)
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    return dest


def _other_tokenizer(src: Path, dest: Path) -> Path:
    """Same model and vocabulary size, but a tokenizer that maps characters to other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dest)
    for p in dest.glob("tokenizer*.json"):
        p.unlink()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for code in reversed(range(32, 127)):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(dest)
    return dest


def _wide_llama(dest: Path) -> Path:
    """A tiny Llama like tiny_models.make_tiny_llama but with another MLP width (merge shape mismatch)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import VOCAB, make_char_tokenizer

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).eval().save_pretrained(dest)
    make_char_tokenizer().save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def bad_assets(tmp_path_factory, tiny_llama, tiny_gpt2) -> dict[str, Path]:
    from tiny_models import perturbed_copy, write_text

    home = tmp_path_factory.mktemp("bad_assets")
    assets: dict[str, Path] = {"llama": tiny_llama, "gpt2": tiny_gpt2}
    assets["ft1"] = perturbed_copy(tiny_llama, home / "ft1", seed=1)
    assets["ft2"] = perturbed_copy(tiny_llama, home / "ft2", seed=2)
    assets["gpt2-ft"] = perturbed_copy(tiny_gpt2, home / "gpt2-ft", seed=3)
    assets["wide"] = _wide_llama(home / "wide")
    assets["pickle"] = _pickle_only(tiny_llama, home / "pickle")
    assets["nan"] = _rewrite_weights(tiny_llama, home / "nan", _set_nan)
    assets["inf"] = _rewrite_weights(tiny_llama, home / "inf", _set_inf)
    assets["other-tok"] = _other_tokenizer(tiny_llama, home / "other-tok")

    # Runs of the tool itself, with the relative paths the cases use (cwd = a root like theirs),
    # so an adapt checkpoint's fingerprint matches the cases' `std(ctx, "adapt")` invocation.
    work = home / "runs"
    work.mkdir()
    shutil.copytree(tiny_llama, work / "model")
    write_text(work / "data.txt")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        _cli(["compress", "model", "--calib", "data.txt", *TINY["compress"], "--skip-eval", "--out", "factored"])
        _cli(["adapt", "model", "--data", "data.txt", *TINY["adapt"], "--save-every", "1", "--out", "adapter",
              "--quiet"])
    finally:
        os.chdir(cwd)
    assets["factored"] = work / "factored"
    assets["adapter"] = work / "adapter"
    assets["ckpt"] = work / "adapter.checkpoints"
    assert (assets["ckpt"] / "step-000001" / "trainer.json").is_file(), sorted(os.listdir(assets["ckpt"]))
    assert json.loads((assets["factored"] / "config.json").read_text())  # a factored checkpoint
    return assets


@pytest.fixture()
def bad_ctx(tmp_path, monkeypatch, bad_assets) -> Ctx:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)
    return Ctx(root, bad_assets, scope=tmp_path)
