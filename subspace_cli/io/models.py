"""Model references: a local directory, a hub id already in the local cache, or builtin:NAME.

`resolve_model_path` turns a reference into a local directory without loading anything;
`load_tokenizer` reads its tokenizer; modules/loading.py `load_model_and_tokenizer` loads the model.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from subspace_cli.errors import UsageError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(ref: str) -> Path:
    """Map a model reference to a local Hugging Face directory (exit 2 when impossible)."""
    if ref.startswith("builtin:"):
        from subspace_cli.io.builtins import resolve_builtin_model

        return resolve_builtin_model(ref.removeprefix("builtin:"))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model directory '{ref}' has no config.json; pass a Hugging Face model directory")
        return path
    if path.exists():
        raise UsageError(f"model '{ref}' is a file; pass a Hugging Face model directory (with config.json)")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or not _HUB_ID.match(ref):
        raise UsageError(f"model directory '{ref}' does not exist; pass a local model directory, a cached hub id or builtin:smollm2-135m")
    return _resolve_hub_id(ref)


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError) or not a repo id: try the hub, below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as exc:  # network errors, gated repos, unknown ids
            reason = f"the hub is not reachable ({type(exc).__name__})"
    raise UsageError(
        f"model '{repo_id}' is not in the local Hugging Face cache and {reason}; "
        "download it elsewhere and pass the local directory path instead"
    )


def torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"--dtype '{name}' is not supported; valid: {', '.join(DTYPES)}")
    return getattr(torch, name)


# A directory holds a tokenizer's vocabulary in one of these (spiece.model: T5-style sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"model directory '{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                         "copy them from the model it was made from (save_pretrained of its tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UsageError(f"cannot load the tokenizer in '{path}': {reason}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
