"""Find the repeated blocks of a model and the Linear-like layers inside them, generically.

No per-architecture table: the blocks are the largest `nn.ModuleList` whose children share one
class and contain Linear (or GPT-2 `Conv1D`) layers. Works for Llama decoders, GPT-2 and BERT
encoders alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.errors import UsageError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: y = x @ W + b with W stored as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the storage convention (a view, no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = weight_matrix(module)
    return w.shape[1], w.shape[0]


@dataclass
class Blocks:
    path: str  # dotted path of the ModuleList, e.g. "model.layers"
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def block_path(self, i: int) -> str:
        return f"{self.path}.{i}"


def find_blocks(model: nn.Module) -> Blocks:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear_like(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UsageError(
            f"found no repeated blocks with Linear layers in {type(model).__name__}; "
            "subspace supports transformer models whose layers are an nn.ModuleList"
        )
    return Blocks(path=best[1], modules=best[2])


def block_linears(
    block: nn.Module, prefix: str, targets: str | None = None, exclude: str | None = None
) -> dict[str, nn.Module]:
    """Linear-like layers of one block as {full dotted path: module}, filtered by regexes."""
    found = {}
    for name, module in block.named_modules():
        if not is_linear_like(module):
            continue
        full = f"{prefix}.{name}"
        if targets and not re.search(targets, full):
            continue
        if exclude and re.search(exclude, full):
            continue
        found[full] = module
    return found


def compile_pattern(pattern: str | None, flag: str) -> str | None:
    """Validate a user regex early so a typo fails with exit 2, not mid-run."""
    if pattern is None:
        return None
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{flag} '{pattern}' is not a valid regular expression: {exc}") from exc
    return pattern


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
