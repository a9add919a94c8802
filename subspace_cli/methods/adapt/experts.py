"""Mixture-of-experts weights stored as one 3-D nn.Parameter per projection, and their LoRA export.

transformers 5 keeps a block's experts as stacks, e.g. MixtralExperts.gate_up_proj [E, 2I, H] and
down_proj [E, H, I] (expert e computes x @ W[e]ᵀ), beside a router that is not an nn.Linear. Such a
stack is no Linear layer, so the Linear adapters cannot wrap it; LoRA reaches it as PEFT 0.21 does,
through `LoraConfig.target_parameters` (peft/tuners/lora/layer.py, `ParamWrapper`): one pair per
expert, W'[e] = W[e] + s·B_e·A_e (Hu et al. 2021, arXiv 2106.09685, applied per expert slice).

PEFT packs the E pairs of one stack into two Linears (`ParamWrapper.update_layer`, `get_delta_weight`):

    lora_A.weight [E·r, in]:  rows e·r … e·r + r − 1 are A_e [r, in]
    lora_B.weight [out, r·E]: column k·E + e is column k of B_e [out, r]  (reshape(out, r, E))

with (out, in) the stack's [E, out, in] slice, or (in, out) of a module with `is_transposed`
([E, in, out] storage). Several stacks of one module are wrapped in nested ParamWrappers, the first
registered parameter innermost; the one for `name` is found by walking `base_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.methods.adapt.base import LoraDelta



@dataclass
class ExpertLoraDelta(LoraDelta):
    """An exact per-expert LoRA export of one stack: A [E, r, in], B [E, out, r] (scaling folded
    into B), ΔW[e] = B[e]·A[e] in the slice's [out, in]. No DoRA (PEFT's ParamWrapper has none)."""

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def experts(self) -> int:
        return self.A.shape[0]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A [E·r, in], lora_B [out, r·E]) in PEFT's ParamWrapper layout."""
        e, r, in_f = self.A.shape
        return self.A.reshape(e * r, in_f), self.B.permute(1, 2, 0).reshape(self.B.shape[1], r * e)


def param_wrapper(root: nn.Module, path: str) -> nn.Module:
    """PEFT's ParamWrapper of the parameter at `path` ('….experts.gate_up_proj') in `root`, the model
    PEFT wrapped (nested wrappers: the outermost sits at the module's path)."""
    module_path, _, name = path.rpartition(".")
    layer = root.get_submodule(module_path)
    while getattr(layer, "parameter_name", None) != name:
        if not hasattr(layer, "base_layer"):
            raise KeyError(f"no PEFT ParamWrapper for '{path}'")
        layer = layer.base_layer
    return layer


def unpack(layer: nn.Module, adapter: str = "default") -> ExpertLoraDelta:
    """A trained ParamWrapper's pairs as an ExpertLoraDelta (float32 copies, scaling folded into B)."""
    e = layer.num_experts
    a = layer.lora_A[adapter].weight.detach().float()  # [E·r, in]
    b = layer.lora_B[adapter].weight.detach().float() * layer.scaling[adapter]  # [out, r·E]
    r = a.shape[0] // e
    return ExpertLoraDelta(a.reshape(e, r, a.shape[1]).clone(), b.reshape(b.shape[0], r, e).permute(2, 0, 1).clone())
