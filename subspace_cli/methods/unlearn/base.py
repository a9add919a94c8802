"""The unlearn contract and what its methods share: the targeted weights, layer activations, batches.

A method's `plan(model, data, config, generator) -> UnlearnPlan` selects the parameters that may
train (the pipeline freezes everything else, so only `plan.targeted` tensors can change) and
gives the loss of one step on a forget batch and a retain batch. The pipeline owns the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.methods.registry import Method, MethodConfig
from subspace_cli.walk import block_linears, compile_pattern, find_blocks, linear_names


@dataclass
class UnlearnData:
    forget: torch.Tensor  # [n_f, L] token ids of the forget set
    retain: torch.Tensor  # [n_r, L] token ids of the retain set


@dataclass
class UnlearnPlan:
    params: list[nn.Parameter]  # what the optimizer updates
    # (forget row indices [B], retain row indices [B]) -> (loss, its parts as floats)
    loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
    targeted: list[str]  # checkpoint names of the weights that may change
    finish: Callable[[], None] = lambda: None  # e.g. bake parametrizations into plain weights
    diagnostics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for the report's notes (e.g. what the layout probe found)



@dataclass(frozen=True, kw_only=True)
class UnlearnMethod(Method):
    """An unlearn method: `plan` picks what trains and the loss of one step; the pipeline owns the loop."""

    verb: ClassVar[str] = "unlearn"
    plan: Callable[[nn.Module, UnlearnData, Any, torch.Generator], UnlearnPlan]

class UnlearnConfig(MethodConfig):
    """Options every unlearn method has. Defaults are sized for SmolLM2-135M on CPU (docs/unlearn.md)."""

    layer: int | None = Field(None, ge=0, description="block whose output activations are steered (rmu, sspu); "
                              "default: a quarter of the depth")
    update_layers: list[int] | None = Field(None, description="blocks whose weights train (default: layer−2 … layer)")
    modules: str = Field(r"mlp\.down_proj", description="regex: which Linear layers of those blocks train")
    steps: int = Field(60, ge=1, description="optimizer steps")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, description="forget rows and retain rows per step")


def default_layer(model: nn.Module, config: UnlearnConfig) -> int:
    n_blocks = len(find_blocks(model).modules)
    layer = config.layer if config.layer is not None else max(n_blocks // 4, 0)
    if layer >= n_blocks:
        raise UsageError(f"-O layer={layer} is out of range: the model has {n_blocks} blocks (0 … {n_blocks - 1})")
    return layer


def targeted_linears(model: nn.Module, config: UnlearnConfig, layer: int) -> dict[str, nn.Module]:
    """{dotted path: Linear} of the `modules` regex inside the update blocks."""
    from subspace_cli.methods.unlearn.architecture import update_blocks

    blocks = find_blocks(model)
    update = update_blocks(model, config.update_layers, layer)
    compile_pattern(config.modules, "-O modules")
    found: dict[str, nn.Module] = {}
    for index in update:
        found.update(block_linears(blocks.modules[index], blocks.block_path(index), config.modules))
    if not found:
        raise UsageError(f"-O modules='{config.modules}' matched no Linear layer in blocks {update}; "
                         f"the blocks hold: {', '.join(linear_names(blocks, update[0]))}")
    return found


def trainable_weights(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[list[nn.Parameter], list[str]]:
    """Freeze the model, unfreeze the weights of `layers`; (params, their checkpoint names)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params, names = [], []
    for path, module in layers.items():
        weight = module.weight  # the Parameter itself (GPT-2 Conv1D stores it [in, out])
        weight.requires_grad_(True)
        params.append(weight)
        names.append(f"{path}.weight")
    return params, names


class _Stop(Exception):
    pass


def layer_output(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Output hidden states of block `layer`: [B, L, d]. The forward stops there (later blocks never run)."""
    block = find_blocks(model).modules[layer]
    captured: list[torch.Tensor] = []

    def grab(module, args, out):
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Stop

    handle = block.register_forward_hook(grab)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `input_ids` [B, L]."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def frozen_activations(model: nn.Module, layer: int, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Block `layer`'s outputs for all rows before any update: [n, L, d] (the retain targets)."""
    return torch.cat([layer_output(model, layer, ids[i:i + batch_size]).detach()
                      for i in range(0, ids.shape[0], batch_size)])
