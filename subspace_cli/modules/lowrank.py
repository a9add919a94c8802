"""Low-rank Linear factors and helpers around the factored layout.

`LowRankLinear` itself is defined in `remote_modeling.py` (that file is shipped inside every
factored checkpoint, so there is exactly one definition); it is re-exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from subspace_cli.io.discovery import is_conv1d, set_submodule

from .remote_modeling import FORMAT_VERSION, LowRankLinear, apply_factored_layout

__all__ = ["FORMAT_VERSION", "LowRankLinear", "apply_factored_layout", "factored_layout", "densify_"]


def factored_layout(model: nn.Module) -> dict:
    """The layout dict describing every LowRankLinear in `model` (what config.json stores)."""
    return {
        name: {
            "kind": "lowrank",
            "rank": m.rank,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.up.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }


def _transformers_base(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model")


def densify_(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear by the dense module the architecture declares there, in place.

    The original module type (nn.Linear, or GPT-2's Conv1D whose weight is stored [in, out]) is
    read from a meta-device skeleton of the architecture, so the result is a plain checkpoint.
    """
    paths = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not paths:
        return model
    with torch.device("meta"):
        skeleton = _transformers_base(model)(model.config)
    for path in paths:
        lr = model.get_submodule(path)
        like = skeleton.get_submodule(path)
        w = lr.dense_weight().detach()  # [out, in]
        bias = lr.up.bias
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
