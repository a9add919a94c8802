"""Streaming checkpoint reads for merging: Hugging Face weights one tensor at a time.

  LazyCheckpoint   a model directory (model.safetensors, or shards + model.safetensors.index.json)
                   seen as name -> tensor; shapes and dtypes come from the safetensors headers, and
                   `get` reads only the tensor asked for.
  PickleFile       one pickle weight file behind SafetensorsFile's reading interface (--allow-pickle).
  compare_layouts  checks from the headers alone that several checkpoints share one layout.

Neighbours: io/safetensors_file.py (the per-tensor file reads), io/lora_checkpoint.py (a base plus
a PEFT LoRA adapter, read as merged) and io/sharded_writer.py (the streaming writer). Tensors are
read with plain file reads, not memory maps, so the resident set holds only the tensors in hand
and models larger than RAM can be merged. Pickle (.bin) weights can run code when loaded: they
are refused unless `allow_pickle`, and then read through `PickleFile` (torch.load with
weights_only and a memory map, so still one tensor at a time).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.safetensors_file import SafetensorsFile
from subspace_cli.io.sharded_writer import SAFE_INDEX, SAFE_SINGLE

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read '{path}': {err}") from err


@runtime_checkable
class CheckpointReader(Protocol):
    """What the merge pipeline needs from a checkpoint: LazyCheckpoint and LoraCheckpoint both fit."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def __contains__(self, name: object) -> bool: ...
    @property
    def config(self) -> dict: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------- PickleFile


class PickleFile:
    """One pickle weight file (pytorch_model*.bin, adapter_model.bin) with SafetensorsFile's reading
    interface (keys / entries / shape / dtype / read / close).

    Loaded with `weights_only=True` (tensors and plain containers only, no arbitrary objects) and,
    for the zip format torch has written since 1.6, `mmap=True`: tensors stay in the file until read,
    so `read` copies one tensor at a time. The pages it touched stay mapped until `close()`. The
    legacy (pre-zip) format cannot be mapped and is loaded whole.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path))
        except Exception as err:  # UnpicklingError (not weights only), RuntimeError (corrupt zip), OSError, EOFError
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(f"cannot read pickle weights '{self.path}': {first}; it must be a state dict of "
                             "tensors as torch.save writes it") from err
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise UsageError(f"pickle weights '{self.path}' are not a flat state dict (name -> tensor)")
        self.entries: dict[str, torch.Tensor] = state

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def read(self, name: str) -> torch.Tensor:
        """A fresh contiguous copy the caller owns (the stored tensor may be a view of a shared or mapped storage)."""
        tensor = self.entries[name]
        return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)

    def close(self) -> None:
        self.entries = {}  # drops the last references to the mapped storages

    def __enter__(self) -> PickleFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- LazyCheckpoint


class LazyCheckpoint:
    """A Hugging Face model directory read one tensor at a time.

    `names()` is sorted by name (the same order whether the weights are sharded or not).
    One handle per shard is opened on first use and kept until `close()`. Safetensors weights are
    preferred; pickle weights (pytorch_model.bin, or its index and shards) are read only with
    `allow_pickle`.
    """

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise UsageError(f"model directory '{self.path}' {what}")
        self._handles: dict[Path, SafetensorsFile | PickleFile] = {}
        try:
            self._file_of = self._locate_tensors()
        except BaseException:
            self.close()
            raise
        self._names = sorted(self._file_of)
        self._config: dict | None = None

    def _locate_tensors(self) -> dict[str, Path]:
        index, single = self.path / SAFE_INDEX, self.path / SAFE_SINGLE
        if index.is_file():
            return self._sharded(index)
        if single.is_file():
            with SafetensorsFile(single) as handle:
                return {name: single for name in handle.keys()}
        if any(self.path.glob("model-*.safetensors")):
            raise UsageError(f"'{self.path}' has sharded model-*.safetensors files but no {SAFE_INDEX}; "
                             "the index says which tensor lives in which shard")
        if any(self.path.glob("pytorch_model*.bin")):
            if not self.allow_pickle:
                raise UsageError(
                    f"'{self.path}' only has pickle weights (pytorch_model*.bin), which can run code when loaded; "
                    "pass --allow-pickle if you trust its source, or convert it to safetensors once "
                    "(save_pretrained(new_dir, safe_serialization=True))")
            return self._locate_pickled()
        raise UsageError(f"'{self.path}' has no weights ({SAFE_SINGLE} or {SAFE_INDEX} with its shards"
                         f"{'' if self.allow_pickle else '; or, with --allow-pickle, ' + PICKLE_SINGLE})")

    def _sharded(self, index: Path) -> dict[str, Path]:
        """tensor name -> shard file, from a weight-map index (safetensors or pickle shards alike)."""
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UsageError(f"'{index}' has no weight_map")
        file_of = {str(name): self.path / str(shard) for name, shard in weight_map.items()}
        for shard in sorted(set(file_of.values())):
            if not shard.is_file():
                raise UsageError(f"weight file '{shard}' listed in '{index}' is missing")
        return file_of

    def _locate_pickled(self) -> dict[str, Path]:
        index, single = self.path / PICKLE_INDEX, self.path / PICKLE_SINGLE
        if index.is_file():
            return self._sharded(index)
        if single.is_file():
            # The names are only known once the file is loaded; keep that handle for the reads.
            handle = self._handles[single] = PickleFile(single)
            return {name: single for name in handle.keys()}
        raise UsageError(f"'{self.path}' has pytorch_model*.bin shards but no {PICKLE_INDEX}; "
                         "the index says which tensor lives in which shard")

    def _handle(self, name: str) -> tuple[SafetensorsFile | PickleFile, Path]:
        try:
            file = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor '{name}' is not in checkpoint '{self.path}'") from None
        handle = self._handles.get(file)
        if handle is None:
            opener = SafetensorsFile if file.suffix == ".safetensors" else PickleFile
            handle = self._handles[file] = opener(file)
        if name not in handle.entries:
            raise UsageError(f"tensor '{name}' listed for '{file}' is not in that file")
        return handle, file

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header; the tensor is not read."""
        return self._handle(name)[0].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """From the file header; the tensor is not read."""
        return self._handle(name)[0].dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """Read this one tensor: a CPU tensor in its stored dtype, owned by the caller (a plain file
        read, so the resident set holds only the tensors in hand; see io/safetensors_file.py)."""
        return self._handle(name)[0].read(name)

    @property
    def config(self) -> dict:
        """config.json as a dict, or {} when the directory has none."""
        if self._config is None:
            file = self.path / "config.json"
            data = _read_json(file) if file.is_file() else {}
            self._config = data if isinstance(data, dict) else {}
        return self._config

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LazyCheckpoint('{self.path}', {len(self._names)} tensors)"


# ----------------------------------------------------------------------------- layouts


def compare_layouts(reference: CheckpointReader, others: list[tuple[str, CheckpointReader]],
                    reference_label: str = "the base") -> None:
    """Raise UsageError at the first tensor (in reference order) that another checkpoint lacks,
    has with another shape, or has in excess. Reads shapes from headers only."""
    ref_names = reference.names()
    ref_set = set(ref_names)
    for label, other in others:
        for name in ref_names:
            if name not in other:
                raise UsageError(f"model '{label}' differs from {reference_label} at tensor '{name}': missing in "
                                 f"'{label}'; merging needs identical architectures and vocabularies")
            mine, theirs = other.shape(name), reference.shape(name)
            if mine != theirs:
                raise UsageError(f"model '{label}' differs from {reference_label} at tensor '{name}': shape "
                                 f"{mine} vs {theirs}; merging needs identical architectures and vocabularies")
        for name in other.names():
            if name not in ref_set:
                raise UsageError(f"model '{label}' differs from {reference_label} at tensor '{name}': not in "
                                 f"{reference_label} (extra in '{label}'); merging needs identical architectures "
                                 "and vocabularies")
