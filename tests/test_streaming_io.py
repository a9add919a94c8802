"""Plain-read safetensors access and the planned (unbuffered) shard writer: byte-level agreement with
the safetensors library, the same shards as ShardedWriter, clear errors on corrupt files."""

from __future__ import annotations

import gc
import json
import os
import resource

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from subspace_cli.errors import UsageError
from subspace_cli.io.planned_writer import PlannedShardWriter, TensorSpec, plan_shards
from subspace_cli.io.safetensors_file import SafetensorsFile
from subspace_cli.io.sharded_writer import ShardedWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(7, 5, generator=g),
        "w.bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "w.f16": torch.randn(6, generator=g).half(),
        "ids": torch.arange(10, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_reader_matches_safetensors_bitwise(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "a.safetensors") as f, safe_open(str(tmp_path / "a.safetensors"), "pt") as ref:
        assert sorted(f.keys()) == sorted(ref.keys()) and f.metadata == {"format": "pt"}
        for name in ref.keys():
            got = f.read(name)
            assert got.dtype == ref.get_tensor(name).dtype == f.dtype(name), name
            assert got.shape == ref.get_tensor(name).shape and tuple(got.shape) == f.shape(name), name
            assert torch.equal(got, ref.get_tensor(name)), name
            got.zero_() if got.numel() else None  # owned: editing it leaves later reads untouched
            assert torch.equal(f.read(name), tensors[name]), name


@pytest.mark.parametrize("corruption,message", [
    (lambda raw: raw[:5], "too short"),
    (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "does not fit"),
    (lambda raw: raw[:8] + b"!" + raw[9:], "not JSON"),
    (lambda raw: raw[:-4], "data offsets"),
])
def test_corrupt_files_are_usage_errors(tmp_path, corruption, message):
    save_file({"x": torch.ones(4)}, str(tmp_path / "ok.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corruption((tmp_path / "ok.safetensors").read_bytes()))
    with pytest.raises(UsageError, match=message):
        SafetensorsFile(bad)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
@pytest.mark.parametrize("reader", ["ours", "memory map"])
def test_reads_do_not_grow_the_resident_set_with_the_file(tmp_path, reader):
    # A memory map leaves every page read resident while the file is open; plain reads keep only the
    # tensor in hand. The memory-map row shows the measurement can tell them apart.
    save_file({f"t{i}": torch.randn(1024, 1024) for i in range(24)}, str(tmp_path / "model.safetensors"))  # 96 MiB
    gc.collect()
    before = _rss_mib()
    if reader == "ours":
        handle = SafetensorsFile(tmp_path / "model.safetensors")
        read = handle.read
    else:
        handle = safe_open(str(tmp_path / "model.safetensors"), "pt")
        read = handle.get_tensor
    checksum = sum(float(read(f"t{i}").sum()) for i in range(24))  # every page of every tensor
    grown = _rss_mib() - before
    del handle, read
    assert checksum == checksum  # the tensors were read
    if reader == "ours":
        assert grown < 32, grown  # measured ≈ 0-8 MiB
    else:
        assert grown > 64, grown  # measured ≈ 96 MiB


def test_planned_writer_writes_what_sharded_writer_writes(tmp_path):
    tensors = _tensors()
    layout = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    for limit in (10**6, 120, 1):  # one shard; a few; one tensor per shard
        planned, buffered = tmp_path / f"planned-{limit}", tmp_path / f"buffered-{limit}"
        with PlannedShardWriter(planned, limit, layout) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            summary = writer.finish()
        with ShardedWriter(buffered, limit) as reference:
            for name, tensor in tensors.items():
                reference.add(name, tensor)
            expected = reference.finish()
        assert summary == expected, limit
        assert len(plan_shards(layout, limit)) == len(summary["shards"])
        if len(summary["shards"]) > 1:
            index = json.loads((planned / "model.safetensors.index.json").read_text())
            assert index == json.loads((buffered / "model.safetensors.index.json").read_text())
        for shard in summary["shards"]:
            ours, theirs = load_file(str(planned / shard)), load_file(str(buffered / shard))
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
            with open(planned / shard, "rb") as f:
                assert int.from_bytes(f.read(8), "little") % 8 == 0  # header padded like safetensors pads it


def test_planned_writer_refuses_out_of_plan_tensors_and_cleans_up(tmp_path):
    layout = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (3,), torch.float32)]
    with PlannedShardWriter(tmp_path / "o", 8, layout) as writer:
        with pytest.raises(ValueError, match="expected 'a' next"):
            writer.add("b", torch.zeros(3))
        with pytest.raises(ValueError, match="layout says"):
            writer.add("a", torch.zeros(2, dtype=torch.float64))
        writer.add("a", torch.zeros(2))
        with pytest.raises(ValueError, match="'b' and later"):
            writer.finish()
    assert not any((tmp_path / "o").iterdir())  # aborted: no temporary shard left
