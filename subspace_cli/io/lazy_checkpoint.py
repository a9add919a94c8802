"""Streaming checkpoint reads for merging: Hugging Face weights one tensor at a time.

  LazyCheckpoint   a model directory (model.safetensors, or shards + model.safetensors.index.json)
                   seen as name -> tensor; shapes and dtypes come from the safetensors headers, and
                   `get` reads only the tensor asked for.
  compare_layouts  checks from the headers alone that several checkpoints share one layout.

Neighbours: io/safetensors_file.py (the per-tensor file reads), io/lora_checkpoint.py (a base plus
a PEFT LoRA adapter, read as merged) and io/sharded_writer.py (the streaming writer). Tensors are
read with plain file reads, not memory maps, so the resident set holds only the tensors in hand
and models larger than RAM can be merged. Pickle (.bin) weights are refused: they can run
code when loaded and cannot be read lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.safetensors_file import SafetensorsFile
from subspace_cli.io.sharded_writer import SAFE_INDEX, SAFE_SINGLE


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


# ----------------------------------------------------------------------------- LazyCheckpoint


class LazyCheckpoint:
    """A Hugging Face model directory read one tensor at a time.

    `names()` is sorted by name (the same order whether the weights are sharded or not).
    One safetensors handle per shard is opened on first use and kept until `close()`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise UsageError(f"model directory '{self.path}' {what}")
        self._file_of = self._locate_tensors()
        self._names = sorted(self._file_of)
        self._handles: dict[Path, SafetensorsFile] = {}
        self._config: dict | None = None

    def _locate_tensors(self) -> dict[str, Path]:
        index, single = self.path / SAFE_INDEX, self.path / SAFE_SINGLE
        if index.is_file():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise UsageError(f"'{index}' has no weight_map")
            file_of = {str(name): self.path / str(shard) for name, shard in weight_map.items()}
            for shard in sorted(set(file_of.values())):
                if not shard.is_file():
                    raise UsageError(f"weight file '{shard}' listed in '{index}' is missing")
            return file_of
        if single.is_file():
            with SafetensorsFile(single) as handle:
                return {name: single for name in handle.keys()}
        if any(self.path.glob("model-*.safetensors")):
            raise UsageError(f"'{self.path}' has sharded model-*.safetensors files but no {SAFE_INDEX}; "
                             "the index says which tensor lives in which shard")
        if any(self.path.glob("pytorch_model*.bin")):
            raise UsageError(
                f"'{self.path}' only has pickle weights (pytorch_model*.bin); merging reads safetensors only. "
                "Convert it once: load it with transformers (AutoModelForCausalLM.from_pretrained) and save it "
                "with save_pretrained(new_dir, safe_serialization=True) (transformers >= 5 always writes "
                "safetensors)")
        raise UsageError(f"'{self.path}' has no weights ({SAFE_SINGLE} or {SAFE_INDEX} with its shards)")

    def _handle(self, name: str) -> tuple[SafetensorsFile, Path]:
        try:
            file = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor '{name}' is not in checkpoint '{self.path}'") from None
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = SafetensorsFile(file)
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
