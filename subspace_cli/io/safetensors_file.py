"""One safetensors file read tensor by tensor with plain file reads, not a memory map.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a read touches stays in
the process's resident set until the handle closes. Streaming a merge through N checkpoints would
then hold all N files resident by the end. Reading each tensor into its own buffer keeps the
resident set at the tensors in hand; the file pages stay in the OS page cache, outside it.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length n,
n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data, offsets relative to its start.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from subspace_cli.errors import UsageError

_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit

# safetensors dtype codes -> torch dtypes; the exotic ones only where this torch has them.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _code, _attr in (("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2", "float8_e5m2"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
del _code, _attr
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    dtype: str               # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int               # byte offsets into the data section
    end: int


class SafetensorsFile:
    """Header parsed once; `read(name)` returns a fresh CPU tensor the caller owns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise UsageError(f"cannot open safetensors file '{self.path}': {err}") from err
        try:
            self.entries, self.metadata, self._data_start = self._parse()
        except BaseException:
            self.close()
            raise

    def _corrupt(self, why: str) -> UsageError:
        return UsageError(f"corrupt or unreadable safetensors file '{self.path}': {why}")

    def _parse(self) -> tuple[dict[str, Entry], dict | None, int]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._corrupt(f"{size} bytes is too short for a header")
        length = int.from_bytes(head, "little")
        if length > min(_MAX_HEADER, size - 8):
            raise self._corrupt(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"the header is not JSON ({err})") from err
        if not isinstance(header, dict):
            raise self._corrupt("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        data_size = size - 8 - length
        entries = {}
        for name, info in header.items():
            try:
                code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise self._corrupt(f"tensor '{name}' has a malformed entry {info!r}") from err
            if code not in DTYPES:
                raise UsageError(f"tensor '{name}' in '{self.path}' has dtype {code}, which this torch "
                                 f"{torch.__version__} cannot represent")
            expected = math.prod(shape) * torch.empty((), dtype=DTYPES[code]).element_size()
            if not (0 <= begin <= end <= data_size) or end - begin != expected:
                raise self._corrupt(f"tensor '{name}' ({code}, shape {list(shape)}) has data offsets "
                                    f"[{begin}, {end}] for {expected} bytes in a {data_size}-byte data section")
            entries[name] = Entry(code, shape, int(begin), int(end))
        return entries, metadata, 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name].dtype]

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)  # [bytes]
        view, done = memoryview(raw.numpy()), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self._data_start + entry.begin + done)
            if got == 0:
                raise self._corrupt(f"tensor '{name}' ends past the end of the file")
            done += got
        return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
