"""Writing tensors one at a time into sharded safetensors, named and indexed like transformers does.

ShardedWriter buffers up to one shard and saves it with safetensors; io/planned_writer.py streams
each tensor straight to disk when the whole layout is known in advance (merging).

`parse_size` reads shard limits ("2GB", "500MB", "1.5GiB") as transformers' convert_file_size_to_int.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from subspace_cli.errors import UsageError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


_SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")


# Below this a --shard-size is a slip (a forgotten unit), not a wish for one file per tensor.
MIN_SHARD_BYTES = 1024


def shard_size_bytes(text: str | int, flag: str = "--shard-size") -> int:
    """`parse_size` for a command-line value, the message naming the flag (checked before any work)."""
    try:
        size = parse_size(text)
    except UsageError as err:
        raise UsageError(f"{flag} {text!r}: {err}") from None
    if size < MIN_SHARD_BYTES:
        raise UsageError(f"{flag} {text!r} is {size} bytes: every tensor would get a file of its own; "
                         "pass a size with a unit, e.g. 500MB or 5GB")
    return size


def parse_size(text: str | int) -> int:
    """A size in bytes from "2GB", "500MB", "1.5GiB", "10KB" or a plain integer (bytes).

    Matches transformers' convert_file_size_to_int (units case-insensitive; KB/MB/GB are powers
    of 10, KiB/MiB/GiB powers of 2; a lowercase final 'b' on KB/MB/GB, as in "5Gb", means bits,
    so a byte count of 1/8) and additionally accepts decimals ("1.5GiB") and spaces ("2 GB").
    """
    accepted = "a positive integer (bytes) or a number with KB, MB, GB (10^3) or KiB, MiB, GiB (2^10), e.g. 2GB"
    if isinstance(text, bool):
        raise UsageError(f"bad size {text!r}: expected {accepted}")
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"bad size {text!r}: expected {accepted}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(f"bad size {text!r}: expected {accepted}")
    number, unit = match.groups()
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise UsageError(f"bad size {text!r}: expected {accepted}") from None
    if not unit:
        if value != value.to_integral_value():
            raise UsageError(f"bad size {text!r}: a size without a unit is whole bytes; expected {accepted}")
        size = int(value)
    elif unit.upper() in _SIZE_UNITS:
        size = int(value * _SIZE_UNITS[unit.upper()])
        if unit.upper() in ("GB", "MB", "KB") and unit.endswith("b"):
            size //= 8  # transformers reads a lowercase 'b' as bits
    else:
        raise UsageError(f"bad size {text!r}: unknown unit {unit!r}; expected {accepted}")
    if size <= 0:
        raise UsageError(f"bad size {text!r}: expected {accepted}")
    return size


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def name_shards(out_dir: Path, written: list[tuple[Path, list[str]]], total_bytes: int) -> dict:
    """Rename temporary shards to their final names (`model.safetensors` alone, or
    `model-0000i-of-0000N.safetensors`) and write the index when sharded; returns
    {"shards", "total_bytes", "tensors"}."""
    count = len(written)
    names = ([SAFE_SINGLE] if count == 1 else
             [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
    weight_map: dict[str, str] = {}
    for (tmp, tensor_names), final in zip(written, names):
        os.replace(tmp, out_dir / final)
        weight_map.update({n: final for n in tensor_names})
    if count > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"shards": names, "total_bytes": total_bytes, "tensors": len(weight_map)}


class ShardedWriter:
    """Write tensors one at a time into safetensors shards, transformers-style.

    At most one shard (max_shard_bytes, or one larger tensor) is held in memory. Shards are written
    under temporary names and renamed by `finish()` once their count is known: `model.safetensors`
    alone, or `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # temporary file, its tensor names
        self._seen: set[str] = set()
        self._total = 0
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished:
            raise ValueError("ShardedWriter.add after finish()")
        if name in self._seen:
            raise ValueError(f"tensor '{name}' was already written")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage, and a view would save its whole base storage:
        # give views and aliases of buffered tensors their own copy.
        if tensor.untyped_storage().nbytes() != _nbytes(tensor) or any(
                t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in self._buffer.values()):
            tensor = tensor.clone()
        size = _nbytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self._seen.add(name)
        self._total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        tmp = self.out_dir / f".shard-{len(self._written) + 1:05d}.safetensors.tmp"
        save_file(self._buffer, str(tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def finish(self) -> dict:
        """Flush, name the shards, write the index when sharded; returns {"shards", "total_bytes", "tensors"}."""
        if self._finished:
            raise ValueError("ShardedWriter.finish called twice")
        if not self._seen:
            raise ValueError("ShardedWriter.finish: no tensors were added")
        self._flush()
        self._finished = True
        return name_shards(self.out_dir, self._written, self._total)

    def abort(self) -> None:
        """Delete the temporary shards of an unfinished write."""
        if not self._finished:
            for tmp, _ in self._written:
                tmp.unlink(missing_ok=True)
            self._written.clear()
            self._buffer.clear()
            self._finished = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # a no-op after finish(); otherwise no half-written shards are left behind
