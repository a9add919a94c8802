"""Mixture-of-experts experts inside a block, found by their shape and call: 3-D parameters
[E, out, in], called with the routing (hidden_states, top_k_index, top_k_weights)."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.walk.weights import in_out_features, is_linear_like

# The experts layout subspace factors: transformers' `@use_experts_implementation` classes
# (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts, OlmoeExperts, ...) with these flags, whose
# eager forward is the loop LowRankExperts reproduces (modules/remote_modeling.py).
EXPERT_MATRICES = ("gate_up_proj", "down_proj")
_EXPERT_CALL = ("hidden_states", "top_k_index", "top_k_weights")
_EXPERT_FLAGS = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                 "has_post_expert_norm": False}


@dataclass
class ExpertSet:
    """One experts module: E experts whose weights are 3-D parameters [E, out, in]."""

    path: str  # dotted path, e.g. "model.layers.0.mlp.experts"
    module: nn.Module
    num_experts: int
    unsupported: str | None = None  # why subspace cannot factor it (copied unchanged), None if it can

    def matrix_name(self, param: str, expert: int) -> str:
        """The dotted name of one expert's matrix: `model.layers.0.mlp.experts.gate_up_proj.3`."""
        return f"{self.path}.{param}.{expert}"

    def weight(self, param: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s matrix [out, in] (a view): gate_up_proj [2I, H], down_proj [H, I]."""
        return getattr(self.module, param)[expert]


def _default_apply_gate():
    """transformers' default `act(gate) * up` gating (a class with its own `_apply_gate` gates differently)."""
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # a transformers without the experts interface: no class has `_apply_gate`
        return None
    return default


def _takes_routing(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # follows @wraps to the original
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == _EXPERT_CALL


def as_expert_set(module: nn.Module, path: str) -> ExpertSet | None:
    """An ExpertSet if `module` is an experts module (3-D parameters whose first dim is the number
    of experts, called with (hidden_states, top_k_index, top_k_weights)); None otherwise."""
    params = dict(module.named_parameters(recurse=False))
    cubes = [p for p in params.values() if p.dim() == 3]
    if not cubes or not _takes_routing(module):
        return None
    experts = cubes[0].shape[0]
    if any(p.shape[0] != experts for p in cubes):
        return None
    found = ExpertSet(path, module, experts)
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    flags = {k: getattr(module, k, v) for k, v in _EXPERT_FLAGS.items()}
    if (gate_up is None or down is None or set(params) != set(EXPERT_MATRICES) or flags != _EXPERT_FLAGS
            or gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2]
            or gate_up.shape[2] != down.shape[1] or not hasattr(module, "act_fn")
            or getattr(type(module), "_apply_gate", None) not in (None, _default_apply_gate())):
        shapes = {k: tuple(p.shape) for k, p in params.items()}
        found.unsupported = (f"{type(module).__name__} {shapes} is not the fused [E, 2I, H] gate_up_proj / [E, H, I] "
                             "down_proj layout (no biases, not transposed) that subspace factors")
    return found


def find_experts(block: nn.Module, prefix: str) -> list[ExpertSet]:
    """The experts modules inside one block (Mixtral's mlp.experts, Qwen2-MoE's mlp.experts, ...)."""
    found = []
    for name, module in block.named_modules():
        expert_set = as_expert_set(module, f"{prefix}.{name}" if name else prefix)
        if expert_set is not None:
            found.append(expert_set)
    return found


@dataclass(frozen=True)
class ExpertMatrix:
    """One expert's slice of one 3-D parameter, as a matrix [out, in] to factor."""

    experts: ExpertSet
    param: str  # "gate_up_proj" | "down_proj"
    index: int  # the expert

    @property
    def name(self) -> str:
        return self.experts.matrix_name(self.param, self.index)

    def weight(self) -> torch.Tensor:
        return self.experts.weight(self.param, self.index)


def block_experts(block: nn.Module, prefix: str, targets: str | None = None,
                  exclude: str | None = None) -> dict[str, ExpertMatrix]:
    """Factorable expert matrices of one block as {dotted name: ExpertMatrix}, filtered by the regexes
    (names such as `model.layers.0.mlp.experts.down_proj.3`); unsupported layouts are skipped."""
    found = {}
    for expert_set in find_experts(block, prefix):
        if expert_set.unsupported:
            continue
        for param in EXPERT_MATRICES:
            for e in range(expert_set.num_experts):
                matrix = ExpertMatrix(expert_set, param, e)
                if targets and not re.search(targets, matrix.name):
                    continue
                if exclude and re.search(exclude, matrix.name):
                    continue
                found[matrix.name] = matrix
    return found


def router_paths(block: nn.Module, prefix: str) -> set[str]:
    """Linear routers beside an experts module (a sibling Linear with one output per expert, as
    AFMoE's `gate`): never compressed, since routing decisions hinge on small logit differences."""
    routers = set()
    for name, module in block.named_modules():
        children = dict(module.named_children())
        sets = [as_expert_set(child, "") for child in children.values()]
        counts = {s.num_experts for s in sets if s is not None}
        for child_name, child in children.items():
            if is_linear_like(child) and in_out_features(child)[1] in counts:
                routers.add(".".join(p for p in (prefix, name, child_name) if p))
    return routers


# ----------------------------------------------------------------------------- any 3-D expert stack
# adapt reaches every 3-D expert parameter through PEFT's target_parameters, whatever its layout
# (compress factors only the fused layout above).

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # 3-D too, but kernels, not experts


@dataclass(frozen=True)
class ExpertStack:
    """One 3-D expert parameter of a block: `getattr(module, name)` [E, out, in] (or [E, in, out]
    when the module sets `is_transposed`, as PEFT reads it)."""

    module: nn.Module
    name: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.param.shape)

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(out, in) of one expert's matrix."""
        _, d1, d2 = self.shape
        return (d2, d1) if getattr(self.module, "is_transposed", False) else (d1, d2)


def block_expert_stacks(block: nn.Module, prefix: str, targets: str | None = None,
                        exclude: str | None = None) -> dict[str, ExpertStack]:
    """The 3-D parameters of one block (expert stacks) as {dotted parameter path: ExpertStack}, filtered
    by the same regexes as the Linear layers. Convolution kernels (3-D too) are not experts."""
    found = {}
    for module_name, module in block.named_modules():
        if isinstance(module, _CONVS) or is_linear_like(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() != 3:
                continue
            full = ".".join(p for p in (prefix, module_name, name) if p)
            if (targets and not re.search(targets, full)) or (exclude and re.search(exclude, full)):
                continue
            found[full] = ExpertStack(module, name)
    return found


def block_routers(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Linear layers that route between experts: the direct Linear children of a module that also
    holds the experts (Qwen2-MoE's `mlp.shared_expert_gate` [1, H]; `mlp.gate` [E, H] where the router
    is a Linear). Expert Linears (a ModuleList of experts) and shared-expert MLPs are grandchildren."""
    routers = {}
    for module_name, module in block.named_modules():
        children = dict(module.named_children())
        holds_experts = any(p.dim() == 3 for child in children.values() for p in child.parameters(recurse=False)) \
            or isinstance(children.get("experts"), nn.ModuleList)
        if not holds_experts:
            continue
        for name, child in children.items():
            if is_linear_like(child):
                routers[".".join(p for p in (prefix, module_name, name) if p)] = child
    return routers
