"""Write trained adapters as PEFT LoRA/DoRA adapters on the untouched base, and the curve plot.

Every method exports exact LoRA pairs (`LoraDelta`), so one writer serves all of them: a fresh,
untouched base is wrapped by PEFT with `init_lora_weights=False`, the pairs are copied in, and
PEFT's own `save_pretrained` writes the directory. Scaling is folded into B, so every layer is
written with lora_alpha = its rank (scaling 1); layers of other ranks go in `rank_pattern`.
Expert stacks (3-D parameters, `ExpertLoraDelta`) go to `target_parameters`, packed as PEFT's
ParamWrapper stores them (methods/adapt/experts.py).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from subspace_cli.methods.adapt.base import LoraDelta
from subspace_cli.methods.adapt.experts import ExpertLoraDelta, param_wrapper


def peft_config_for(deltas: dict[str, LoraDelta], use_dora: bool, fan_in_fan_out: bool, base_path: str):
    import peft

    ranks = {path: d.rank for path, d in deltas.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the module path (a parameter's path for
    # target_parameters): escape the dots.
    pattern = {re.escape(path): r for path, r in ranks.items() if r != common}
    stacks = sorted(path for path, d in deltas.items() if isinstance(d, ExpertLoraDelta))
    return peft.LoraConfig(
        r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
        target_modules=sorted(set(deltas) - set(stacks)), target_parameters=stacks or None,
        init_lora_weights=False, use_dora=use_dora, fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_path)


@torch.no_grad()
def attach_exported(base: nn.Module, deltas: dict[str, LoraDelta], use_dora: bool, base_path: str):
    """Wrap the untouched `base` with PEFT and load the exported pairs; returns the PeftModel."""
    import peft

    fan_in_fan_out = any(type(base.get_submodule(p)).__name__ == "Conv1D" for p, d in deltas.items()
                         if not isinstance(d, ExpertLoraDelta))
    # PEFT (AutoPeftModel*, the model card) reads base_model_name_or_path from wherever the adapter
    # is later loaded: a path relative to this run's directory would point nowhere. (A name that is
    # not a local path, such as a hub id, is kept.)
    if Path(base_path).expanduser().exists():
        base_path = os.path.abspath(os.path.expanduser(base_path))
    if "name_or_path" in vars(base):  # get_peft_model takes the name from the model, over the config's
        base.name_or_path = base_path
    config = peft_config_for(deltas, use_dora, fan_in_fan_out, base_path)
    peft_model = peft.get_peft_model(base, config)
    root = peft_model.base_model.model
    for path, delta in deltas.items():
        if isinstance(delta, ExpertLoraDelta):
            layer = param_wrapper(root, path)
            for weight, value in zip((layer.lora_A["default"].weight, layer.lora_B["default"].weight), delta.packed()):
                weight.copy_(value.to(weight.dtype))
            continue
        layer = root.get_submodule(path)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.copy_(delta.A.reshape(a.shape).to(a.dtype))
        b.copy_(delta.B.reshape(b.shape).to(b.dtype))
        if delta.magnitude is not None:
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(delta.magnitude.reshape(magnitude.shape).to(magnitude.dtype))
    return peft_model
