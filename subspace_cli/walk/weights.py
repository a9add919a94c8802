"""Weight access for Linear-like layers, whatever their storage convention (nn.Linear [out, in],
GPT-2 `Conv1D` [in, out]), and swapping a submodule in place."""

from __future__ import annotations

import torch
from torch import nn


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


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
