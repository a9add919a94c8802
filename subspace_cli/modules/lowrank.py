"""Factored modules (low-rank and sparse-dictionary) and helpers around the factored layout.

`LowRankLinear` and `DictionaryLinear` are defined in `remote_modeling.py` (that file is shipped
inside every factored checkpoint, so there is exactly one definition); they are re-exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from subspace_cli.io.discovery import is_conv1d, set_submodule

from .remote_modeling import FORMAT_VERSION, DictionaryLinear, LowRankLinear, apply_factored_layout

__all__ = ["FORMAT_VERSION", "DictionaryLinear", "LowRankLinear", "apply_factored_layout", "factored_layout",
           "densify_", "layout_format_version", "FACTORED_TYPES"]

FACTORED_TYPES = (LowRankLinear, DictionaryLinear)


def _module_spec(module: nn.Module, paths: dict[int, str]) -> dict:
    spec = {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, LowRankLinear):
        return {"kind": "lowrank", "rank": module.rank, "bias": module.up.bias is not None, **spec}
    spec = {"kind": "dictionary", "atoms": module.atoms, "nonzeros": module.nonzeros,
            "positions": module.positions, "bias": module.bias is not None, **spec}
    if module._owner is not None:
        spec["dictionary_of"] = paths[id(module._owner[0])]
    return spec


def factored_layout(model: nn.Module) -> dict:
    """The layout dict describing every factored module in `model` (what config.json stores)."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, FACTORED_TYPES)}
    paths = {id(m): name for name, m in found.items()}
    return {name: _module_spec(m, paths) for name, m in found.items()}


def layout_format_version(layout: dict) -> int:
    """The smallest checkpoint format version that describes `layout` (1 unless dictionaries)."""
    return 2 if any(spec["kind"] == "dictionary" for spec in layout.values()) else 1


def _transformers_base(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model")


def densify_(model: nn.Module) -> nn.Module:
    """Replace every factored module by the dense module the architecture declares there, in place.

    The original module type (nn.Linear, or GPT-2's Conv1D whose weight is stored [in, out]) is
    read from a meta-device skeleton of the architecture, so the result is a plain checkpoint.
    """
    paths = [name for name, m in model.named_modules() if isinstance(m, FACTORED_TYPES)]
    if not paths:
        return model
    with torch.device("meta"):
        skeleton = _transformers_base(model)(model.config)
    # Dense weights first: a shared dictionary must outlive every module that reads it.
    dense_weights = {path: model.get_submodule(path).dense_weight().detach() for path in paths}
    for path in paths:
        lr = model.get_submodule(path)
        like = skeleton.get_submodule(path)
        w = dense_weights[path]  # [out, in]
        bias = lr.up.bias if isinstance(lr, LowRankLinear) else lr.bias
        if is_conv1d(like):
            with torch.device(w.device):
                dense = type(like)(lr.out_features, lr.in_features).to(w.dtype)  # weight [in, out]
            with torch.no_grad():
                dense.weight.copy_(w.T)
                if bias is not None:
                    dense.bias.copy_(bias)
                else:
                    dense.bias.zero_()
        else:
            dense = nn.Linear(lr.in_features, lr.out_features, bias=bias is not None,
                              device=w.device, dtype=w.dtype)
            with torch.no_grad():
                dense.weight.copy_(w)
                if bias is not None:
                    dense.bias.copy_(bias)
        set_submodule(model, path, dense)
    return model
