"""Shared pieces of the verb × architecture matrix (tests/test_matrix_*.py, issue 16).

Every architecture of tiny_architectures.py is built once per test session (under pytest's base
temporary directory, so the three matrix modules share it), with two seeded "fine-tunes" of it for
merge. Sizes are the smallest that still exercise what makes each family different: sequences of
24 tokens pass the sliding window of 8, so the sliding-window layers of Mistral and Gemma differ
from their global ones in every check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_architectures import ARCHITECTURES, DENSE, MOE, SLIDING, make_tiny_arch
from tiny_models import TEXT, perturbed_copy, write_text

__all__ = ["ARCHITECTURES", "DENSE", "MOE", "RETAIN_TEXT", "SEQLEN", "arch_dir", "family", "logits", "probe_ids",
           "tensors", "texts"]

SEQLEN = 3 * SLIDING  # tokens per calibration / training / probe sequence: past the sliding window
RETAIN_TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And God said, Let there be light: and there was light.\n"
) * 40


def _root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "matrix"
    root.mkdir(exist_ok=True)
    return root


def arch_dir(tmp_path_factory, name: str) -> Path:
    """The seeded tiny model of architecture `name` (built on first use, then reused by every module)."""
    path = _root(tmp_path_factory) / name / "base"
    if not (path / "config.json").is_file():
        make_tiny_arch(name, path)
    return path


def family(tmp_path_factory, name: str) -> dict[str, Path]:
    """base and two 'fine-tunes' of it (every tensor plus seeded noise), the inputs of a merge."""
    base = arch_dir(tmp_path_factory, name)
    out = {"base": base}
    for label, seed in (("a", 1), ("b", 2)):
        path = base.parent / label
        if not (path / "config.json").is_file():
            perturbed_copy(base, path, seed)
        out[label] = path
    return out


def texts(tmp_path_factory) -> tuple[Path, Path]:
    """(a Shakespeare-like text, a KJV-like text): calibration / training / forget, and retain."""
    root = _root(tmp_path_factory)
    forget, retain = root / "forget.txt", root / "retain.txt"
    if not forget.is_file():
        write_text(forget, TEXT)
        write_text(retain, RETAIN_TEXT)
    return forget, retain


def probe_ids() -> torch.Tensor:
    """[2, SEQLEN] token ids in [4, 100): no special tokens, every position past the window seen."""
    return torch.randint(4, 100, (2, SEQLEN), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second intra-op thread costs more in hand-offs than it computes, and on a
    loaded 2-core CI machine the spinning threads tripled the matrix's time (measured 115 s against
    34 s for test_matrix_compress.py). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
