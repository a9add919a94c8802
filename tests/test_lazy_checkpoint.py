"""Streaming checkpoint I/O: LazyCheckpoint, LoraCheckpoint (checked against PEFT's own
merge_and_unload), ShardedWriter (checked by loading with transformers), parse_size, compare_layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from subspace_cli.errors import UsageError
from subspace_cli.io.lazy_checkpoint import LazyCheckpoint, compare_layouts
from subspace_cli.io.lora_checkpoint import LoraCheckpoint, get_pattern_key, is_lora_adapter
from subspace_cli.io.sharded_writer import ShardedWriter, parse_size

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 0, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab)
    return LlamaForCausalLM(config).eval()


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _save(_llama(), tmp_path_factory.mktemp("lazy") / "llama")


def _adapter_and_merge(model, lora_config, base_dir: Path, adapter_dir: Path, seed: int = 1) -> dict:
    """Save `model` as the base, wrap it with PEFT, randomise every trainable tensor (lora_B starts
    at zero; modules_to_save copies and trained biases start equal to the base), save the adapter
    and return PEFT's merge_and_unload() state dict."""
    from peft import get_peft_model

    _save(model, base_dir)
    peft_model = get_peft_model(model, lora_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(adapter_dir)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def _assert_matches_merge(base_dir: Path, adapter_dir: Path, merged: dict, tied: set[str] = frozenset()) -> None:
    with LazyCheckpoint(base_dir) as base, LoraCheckpoint(base, adapter_dir) as lora:
        names = lora.names()
        assert set(names) <= set(merged)
        assert set(merged) - set(names) <= set(tied)  # tied weights are not stored
        assert lora.targeted  # the adapter changes something
        for name in names:
            got = lora.get(name)
            assert got.dtype == merged[name].dtype == lora.dtype(name), name
            assert tuple(got.shape) == lora.shape(name) == tuple(merged[name].shape), name
            assert (got - merged[name]).abs().max().item() <= 1e-6, name


# ----------------------------------------------------------------------------- LazyCheckpoint


def test_lazy_checkpoint_single_and_sharded_read_the_same(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    _llama().save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    state = _llama().state_dict()
    with LazyCheckpoint(llama_dir) as single, LazyCheckpoint(sharded) as shards:
        assert single.names() == shards.names() == sorted(state)  # sorted by name, however stored
        assert single.config["hidden_size"] == 32 and single.config == shards.config
        assert "lm_head.weight" in shards and "nope" not in shards
        for name in shards.names():
            assert shards.shape(name) == tuple(state[name].shape)
            assert shards.dtype(name) == torch.float32
            assert torch.equal(shards.get(name), state[name])
            assert torch.equal(single.get(name), state[name])
        n_shards = len(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))
        assert len(shards._handles) == n_shards >= 3  # one handle per shard, reused
        with pytest.raises(KeyError, match="nope"):
            shards.get("nope")
        tensor = shards.get("lm_head.weight")
        tensor += 1  # the caller owns what get() returns: the next read is unchanged
        assert torch.equal(shards.get("lm_head.weight"), state["lm_head.weight"])
    assert not shards._handles  # closed by the context manager


def test_lazy_checkpoint_refuses_pickle_and_missing_weights(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        LazyCheckpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty.*has no weights"):
        LazyCheckpoint(tmp_path / "empty")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UsageError, match=r"pickle weights.*--allow-pickle.*safe_serialization=True"):
        LazyCheckpoint(tmp_path / "pickle")
    with pytest.raises(UsageError, match=r"cannot read pickle weights '.*pytorch_model.bin'"):
        LazyCheckpoint(tmp_path / "pickle", allow_pickle=True)  # an empty file is no state dict
    (tmp_path / "noconfig").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "noconfig" / "model.safetensors"))
    assert LazyCheckpoint(tmp_path / "noconfig").config == {}  # no config.json


@pytest.mark.parametrize("layout", ["single", "sharded", "legacy"])
def test_lazy_checkpoint_reads_pickle_weights_like_safetensors_with_allow_pickle(llama_dir, tmp_path, layout):
    """pytorch_model.bin (zip format, memory-mapped), its sharded form with an index, and torch's pre-1.6
    format (loaded whole) give the same names, shapes, dtypes and bits as the safetensors file."""
    state = load_file(llama_dir / "model.safetensors")
    state["tied.view"] = state["model.embed_tokens.weight"][:4].t()  # a non-contiguous view of a shared storage
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    if layout == "sharded":
        names = sorted(state)
        weight_map = {}
        for i, part in enumerate((names[::2], names[1::2])):
            torch.save({n: state[n] for n in part}, pickled / f"pytorch_model-{i + 1:05d}-of-00002.bin")
            weight_map.update(dict.fromkeys(part, f"pytorch_model-{i + 1:05d}-of-00002.bin"))
        (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, pickled / "pytorch_model.bin", _use_new_zipfile_serialization=layout != "legacy")
    with LazyCheckpoint(pickled, allow_pickle=True) as lazy:
        assert lazy.names() == sorted(state)
        for name, want in state.items():
            assert lazy.shape(name) == tuple(want.shape) and lazy.dtype(name) == want.dtype
            got = lazy.get(name)
            assert got.is_contiguous() and torch.equal(got, want), name
        got += 1  # the caller owns what get() returns
        assert torch.equal(lazy.get(name), state[name])


# ----------------------------------------------------------------------------- LoraCheckpoint


def test_lora_llama_matches_merge_and_unload_with_embedding_and_modules_to_save(tmp_path):
    from peft import LoraConfig

    # embed_tokens LoRA (lora_embedding_A/B), lm_head in modules_to_save (a full replacement).
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS + ["embed_tokens"],
                        modules_to_save=["lm_head"])
    merged = _adapter_and_merge(_llama(), config, tmp_path / "base", tmp_path / "adapter")
    assert is_lora_adapter(tmp_path / "adapter") and not is_lora_adapter(tmp_path / "base")
    _assert_matches_merge(tmp_path / "base", tmp_path / "adapter", merged)
    with LazyCheckpoint(tmp_path / "base") as base, LoraCheckpoint(base, tmp_path / "adapter") as lora:
        assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"} <= \
            set(lora.targeted)
        for name in ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight"]:  # replaced, LoRA-updated
            lora.get(name).add_(1)  # in place: later reads are unchanged
            assert (lora.get(name) - merged[name]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", ["patterns", "rslora"])
def test_lora_llama_rank_alpha_patterns_and_rslora(tmp_path, variant):
    from peft import LoraConfig

    if variant == "patterns":
        # A bare suffix, a dotted suffix and a regex, as PEFT matches them (first match wins).
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "mlp.*_proj": 3},
                            alpha_pattern={"o_proj": 32, r"layers\.0\.mlp\.down_proj": 5})
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True,
                            rank_pattern={"down_proj": 2})
    merged = _adapter_and_merge(_llama(), config, tmp_path / "base", tmp_path / "adapter")
    _assert_matches_merge(tmp_path / "base", tmp_path / "adapter", merged)


def test_lora_gpt2_conv1d_fan_in_fan_out_and_biases(tmp_path):
    from peft import LoraConfig

    # c_attn is (32, 96) in Conv1D layout; attn.c_proj is square, so only the flag can orient it.
    # bias="lora_only" saves the targeted layers' biases; lora_bias adds a trained bias on lora_B.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        bias="lora_only", lora_bias=True)
    merged = _adapter_and_merge(_gpt2(), config, tmp_path / "base", tmp_path / "adapter")
    _assert_matches_merge(tmp_path / "base", tmp_path / "adapter", merged, tied={"lm_head.weight"})

    # Hub GPT-2 files name tensors without the model's 'transformer.' prefix; the adapter still applies.
    (tmp_path / "hub").mkdir()
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()},
              str(tmp_path / "hub" / "model.safetensors"), metadata={"format": "pt"})
    with LazyCheckpoint(tmp_path / "hub") as base, LoraCheckpoint(base, tmp_path / "adapter") as lora:
        for name in ["h.0.attn.c_attn.weight", "h.1.attn.c_proj.bias", "h.1.mlp.c_proj.weight"]:
            assert (lora.get(name) - merged[f"transformer.{name}"]).abs().max().item() <= 1e-6, name


def test_lora_returns_base_dtype(tmp_path):
    from peft import LoraConfig

    merged = _adapter_and_merge(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                                tmp_path / "base", tmp_path / "adapter")
    (tmp_path / "bf16").mkdir()
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "bf16" / "model.safetensors"),
              metadata={"format": "pt"})
    with LazyCheckpoint(tmp_path / "bf16") as base, LoraCheckpoint(base, tmp_path / "adapter") as lora:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert lora.dtype(name) == torch.bfloat16
        got = lora.get(name)
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), merged[name], atol=2e-2)


def test_lora_refusals(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = _llama()
    _save(model, tmp_path / "base")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(tmp_path / "dora")
    with LazyCheckpoint(tmp_path / "base") as base:
        with pytest.raises(UsageError, match=r"use_dora.*subspace adapt --merge.*merge_and_unload"):
            LoraCheckpoint(base, tmp_path / "dora")

        # A non-LoRA method.
        (tmp_path / "ia3").mkdir()
        (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        save_file({"x": torch.zeros(1)}, str(tmp_path / "ia3" / "adapter_model.safetensors"))
        with pytest.raises(UsageError, match="peft_type 'IA3'"):
            LoraCheckpoint(base, tmp_path / "ia3")

        # A LoRA pair whose target is not in the base (trained on a deeper model): named.
        (tmp_path / "deeper").mkdir()
        shutil.copy(tmp_path / "dora" / "adapter_config.json", tmp_path / "deeper")
        cfg = json.loads((tmp_path / "deeper" / "adapter_config.json").read_text())
        cfg["use_dora"] = False
        (tmp_path / "deeper" / "adapter_config.json").write_text(json.dumps(cfg))
        prefix = "base_model.model.model.layers.7.self_attn.q_proj"
        save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 32), f"{prefix}.lora_B.weight": torch.zeros(32, 4)},
                  str(tmp_path / "deeper" / "adapter_model.safetensors"))
        with pytest.raises(UsageError, match=r"model\.layers\.7\.self_attn\.q_proj\.weight.*not in the base"):
            LoraCheckpoint(base, tmp_path / "deeper")

        with pytest.raises(UsageError, match="no adapter_config.json"):
            LoraCheckpoint(base, tmp_path / "base")


def test_get_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    keys = ["v_proj", r"layers\.1\.self_attn\.q_proj", "mlp.*_proj", "proj"]
    for module in ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                   "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "lm_head"]:
        assert get_pattern_key(keys, module) == peft_get_pattern_key(keys, module)


# ----------------------------------------------------------------------------- ShardedWriter


def test_sharded_writer_round_trips_through_transformers(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    state = _llama().state_dict()
    out = tmp_path / "out"
    writer = ShardedWriter(out, max_shard_bytes=10_000)  # the 16 KiB embeddings exceed it: alone
    for name, tensor in state.items():
        writer.add(name, tensor)
    summary = writer.finish()
    assert summary["total_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert summary["tensors"] == len(state) and len(summary["shards"]) >= 3
    n = len(summary["shards"])
    assert summary["shards"][0] == f"model-00001-of-{n:05d}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["shards"] + ["model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == summary["total_bytes"] and set(index["weight_map"]) == set(state)
    embed_shard = index["weight_map"]["model.embed_tokens.weight"]
    assert [k for k, v in index["weight_map"].items() if v == embed_shard] == ["model.embed_tokens.weight"]

    shutil.copy(llama_dir / "config.json", out)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_sharded_writer_single_shard_duplicates_and_views(tmp_path):
    writer = ShardedWriter(tmp_path / "one", max_shard_bytes=parse_size("1MB"))
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    writer.add("a", base)
    writer.add("a_view", base[1:])  # a view: saved as its own 2 x 4 tensor
    writer.add("a_alias", base)     # the same storage twice: copied rather than refused by safetensors
    with pytest.raises(ValueError, match="'a'"):
        writer.add("a", torch.zeros(1))
    summary = writer.finish()
    assert summary["shards"] == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert torch.equal(loaded["a_view"], base[1:]) and torch.equal(loaded["a_alias"], base)
    with LazyCheckpoint(tmp_path / "one") as ckpt:
        assert ckpt.names() == ["a", "a_alias", "a_view"]

    with ShardedWriter(tmp_path / "aborted", max_shard_bytes=8) as writer:
        writer.add("x", torch.zeros(4))
        writer.add("y", torch.zeros(4))  # flushes x to a temporary shard
    assert not any((tmp_path / "aborted").iterdir())  # no finish(): temporaries removed


def test_parse_size():
    from transformers.utils.hub import convert_file_size_to_int

    for text in ["2GB", "500MB", "10KB", "1MiB", "3GiB", "7KiB", "5Gb", "500mb", "2gib", "4kB"]:
        assert parse_size(text) == convert_file_size_to_int(text), text
    assert parse_size("1.5GiB") == 1610612736
    assert parse_size("0.5GB") == 500_000_000
    assert parse_size("2 GB") == 2_000_000_000
    assert parse_size(12345) == parse_size("12345") == 12345
    for bad in ["2TB", "abc", "", "1.5", "-1", "GB", 0, -5, True]:
        with pytest.raises(UsageError, match=r"bad size .*2GB"):
            parse_size(bad)


# ----------------------------------------------------------------------------- compare_layouts


class _Shapes:
    """A checkpoint known only by its shapes."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._shapes = shapes

    def names(self):
        return list(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def __contains__(self, name):
        return name in self._shapes


def test_compare_layouts(llama_dir, tmp_path):
    resized = _llama()
    resized.resize_token_embeddings(130)
    _save(resized, tmp_path / "resized")
    with LazyCheckpoint(llama_dir) as base, LazyCheckpoint(tmp_path / "resized") as other, \
            LazyCheckpoint(llama_dir) as same:
        compare_layouts(base, [("A", same)])
        with pytest.raises(UsageError) as err:
            compare_layouts(base, [("A", same), ("B", other)])
    # names are sorted, so lm_head.weight is the first differing tensor in reference order
    assert str(err.value) == ("model 'B' differs from the base at tensor 'lm_head.weight': shape (130, 32) vs "
                              "(128, 32); merging needs identical architectures and vocabularies")

    ref = _Shapes({"a": (2,), "b": (3,)})
    with pytest.raises(UsageError, match="model 'C' differs from the base at tensor 'b': missing in 'C'"):
        compare_layouts(ref, [("C", _Shapes({"a": (2,)}))])
    with pytest.raises(UsageError, match="model 'D' differs from model 'X' at tensor 'c': not in model 'X'"):
        compare_layouts(ref, [("D", _Shapes({"a": (2,), "b": (3,), "c": (1,)}))], reference_label="model 'X'")
