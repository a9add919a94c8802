"""Sharded safetensors output for a layout known in advance, written as each tensor arrives.

ShardedWriter (io/sharded_writer.py) must buffer a whole shard: a safetensors header lists every
tensor's offsets before the data. When the names, shapes and dtypes are all known up front (a
merge's output has the base's layout), the headers can be written first and each tensor's bytes
appended as it is produced, so no output shard is ever held in memory. Shards are grouped, named
and indexed exactly as ShardedWriter would for the same tensors in the same order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from subspace_cli.io.safetensors_file import CODES
from subspace_cli.io.sharded_writer import name_shards


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(layout: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """ShardedWriter's grouping: a new shard when the current one is non-empty and the next tensor
    would take it past max_shard_bytes (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in layout:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    """8-byte length + JSON header, padded with spaces to a multiple of 8 as safetensors pads it."""
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        entries[spec.name] = {"dtype": CODES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text


class PlannedShardWriter:
    """`add` the layout's tensors in its order; `finish` names the shards. Memory: the tensor in hand."""

    def __init__(self, out_dir: Path, max_shard_bytes: int, layout: list[TensorSpec]):
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        if not layout:
            raise ValueError("PlannedShardWriter needs a non-empty layout")
        names = [spec.name for spec in layout]
        if len(set(names)) != len(names):
            raise ValueError("PlannedShardWriter: the layout names a tensor twice")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shards = plan_shards(layout, max_shard_bytes)
        self._shard = 0  # index of the shard being written
        self._position = 0  # index of the next tensor within it
        self._file: BinaryIO | None = None
        self._written: list[tuple[Path, list[str]]] = []
        self._total = sum(spec.nbytes for spec in layout)
        self._finished = False

    def _tmp(self, index: int) -> Path:
        return self.out_dir / f".shard-{index + 1:05d}.safetensors.tmp"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished or self._shard >= len(self._shards):
            raise ValueError(f"PlannedShardWriter.add('{name}'): every tensor of the layout was written already")
        spec = self._shards[self._shard][self._position]
        if name != spec.name:
            raise ValueError(f"PlannedShardWriter.add: expected '{spec.name}' next in the layout, got '{name}'")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}; the layout says "
                             f"{spec.dtype} {spec.shape}")
        if self._position == 0:
            self._file = open(self._tmp(self._shard), "wb")
            self._file.write(_header(self._shards[self._shard]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # [nbytes], little-endian
        self._file.write(memoryview(data.numpy()))
        self._position += 1
        if self._position == len(self._shards[self._shard]):
            self._file.close()
            self._file = None
            self._written.append((self._tmp(self._shard), [s.name for s in self._shards[self._shard]]))
            self._shard += 1
            self._position = 0

    def finish(self) -> dict:
        """Name the shards and write the index; every tensor of the layout must have been added."""
        if self._finished:
            raise ValueError("PlannedShardWriter.finish called twice")
        if self._shard < len(self._shards):
            missing = self._shards[self._shard][self._position].name
            raise ValueError(f"PlannedShardWriter.finish: '{missing}' and later tensors of the layout were not added")
        self._finished = True
        return name_shards(self.out_dir, self._written, self._total)

    def abort(self) -> None:
        """Delete the temporary shards of an unfinished write."""
        if self._finished:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        for index in range(self._shard + 1):
            self._tmp(index).unlink(missing_ok=True)
        self._finished = True

    def __enter__(self) -> PlannedShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
