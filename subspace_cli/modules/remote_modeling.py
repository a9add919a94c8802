"""Modeling code shipped inside every factored checkpoint written by subspace.

This file is copied verbatim into the checkpoint as `modeling_subspace.py`, followed by one line
such as `SubspaceLlamaForCausalLM = build_model_class("LlamaForCausalLM")`, and config.json points
at that class through `auto_map`. So `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works without subspace installed.

Self-contained on purpose: it imports only the standard library, torch and transformers, never
subspace_cli. Keep it that way, and keep FORMAT_VERSION in step with docs/format.md.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

FORMAT_VERSION = 1


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-r factorisation of a Linear layer, W [out, in] ~= up.weight @ down.weight.

    down.weight is [rank, in], up.weight is [out, rank], the bias (if any) lives on `up`.
    Stores rank * (in + out) weights instead of in * out.
    """

    def __init__(self, in_features, out_features, rank, bias=True, dtype=None, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankLinear rank must be >= 1, got {rank}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        kw = {"dtype": dtype, "device": device}
        self.down = nn.Linear(self.in_features, self.rank, bias=False, **kw)  # weight [r, in]
        self.up = nn.Linear(self.rank, self.out_features, bias=bool(bias), **kw)  # weight [out, r]

    @classmethod
    def from_factors(cls, up_weight, down_weight, bias=None):
        """Build from up [out, r], down [r, in] and an optional bias [out]; the tensors are copied."""
        out_features, rank = up_weight.shape
        rank_d, in_features = down_weight.shape
        if rank != rank_d:
            raise ValueError(f"factor ranks differ: up is {tuple(up_weight.shape)}, down is {tuple(down_weight.shape)}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={out_features}")
        module = cls(in_features, out_features, rank, bias=bias is not None,
                     dtype=up_weight.dtype, device=up_weight.device)
        with torch.no_grad():
            module.up.weight.copy_(up_weight)
            module.down.weight.copy_(down_weight.to(up_weight.dtype))
            if bias is not None:
                module.up.bias.copy_(bias.to(up_weight.dtype))
        return module

    def forward(self, x):
        # (..., in) -> (..., r) -> (..., out)
        return self.up(self.down(x))

    def dense_weight(self):
        """The equivalent dense weight up @ down, [out, in] (nn.Linear convention)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")


def _is_conv1d(module):
    # This file must stay self-contained (it is shipped in checkpoints), so it keeps its own copy
    # of subspace_cli.io.discovery.is_conv1d. GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D): weight stored as [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _dense_shape(module):
    """(in_features, out_features) of a nn.Linear or Conv1D, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.nx, module.nf
    return None


def _build_lowrank(path, spec, old):
    shape = _dense_shape(old)
    if isinstance(old, LowRankLinear) and old.rank == spec["rank"]:
        return None  # already factored (layout applied twice)
    if shape is None:
        raise ValueError(f"subspace layout: module '{path}' is a {type(old).__name__}; "
                         "only nn.Linear and Conv1D modules can be factored")
    want = (int(spec["in_features"]), int(spec["out_features"]))
    if shape != want:
        raise ValueError(f"subspace layout: module '{path}' has (in, out) = {shape}, layout says {want}")
    weight = old.weight
    return LowRankLinear(want[0], want[1], int(spec["rank"]), bias=bool(spec.get("bias", True)),
                         dtype=weight.dtype, device=weight.device)


_BUILDERS = {"lowrank": _build_lowrank}


def apply_factored_layout(model, layout):
    """Replace each module named in `layout` by its factored form, in place; returns `model`.

    layout: {"dotted.module.path": {"kind": "lowrank", "rank": r, "in_features": i,
    "out_features": o, "bias": bool}}. The new module is created on the replaced weight's device
    and dtype; on the meta device (as in from_pretrained) nothing is allocated.
    """
    for path, spec in layout.items():
        kind = spec.get("kind")
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise ValueError(
                f"subspace layout: module '{path}' has unknown kind {kind!r}; this modeling code "
                f"(checkpoint format version {FORMAT_VERSION}) knows {sorted(_BUILDERS)}")
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError as err:
            raise ValueError(f"subspace layout: module '{path}' does not exist in "
                             f"{type(model).__name__}") from err
        new = builder(path, spec, old)
        if new is not None:
            setattr(parent, child, new)
    return model


def _check_section(section):
    if not isinstance(section, dict) or section.get("kind") != "factored":
        raise ValueError("config.subspace is missing or is not a factored-checkpoint section")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {version!r} is not supported by this modeling code "
                         f"(supports <= {FORMAT_VERSION})")


def build_model_class(base_class_name):
    """A subclass of transformers.<base_class_name> whose __init__ applies config.subspace's layout."""
    base = getattr(transformers, base_class_name)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        section = getattr(config, "subspace", None)
        _check_section(section)
        apply_factored_layout(self, section["modules"])

    name = "Subspace" + base_class_name
    # config_class is inherited from `base`, so Auto* registration (which compares config class
    # names) accepts the class for the checkpoint's native config.
    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    return cls
