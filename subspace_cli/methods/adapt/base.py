"""The contract every adapter layer meets, so training, export and merging are method-agnostic.

An `AdapterLayer` wraps one frozen base layer (nn.Linear, or nn.Conv{1,2,3}d for methods that
support it) and adds a trainable update. Whatever its parametrisation (singular values, a sparse
core, a Tucker core, a projected pair), it exports *exactly* as a LoRA pair on the untouched base:

    W_trained = W_base + B·A                          (scaling folded into B)
    DoRA:      W_trained = m ⊙ (W_base + B·A) / ‖W_base + B·A‖_row

so `PeftModel.from_pretrained(untouched_base, out)` reproduces the trained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from subspace_cli.methods.registry import Method


@dataclass
class LoraDelta:
    """An exact low-rank export of one layer's update.

    Linear: A [r, in], B [out, r].
    ConvNd: A [r, in/groups, *kernel] (a conv with the base's kernel, stride, padding, dilation),
            B [out, r, 1, ..., 1] (a 1×…×1 conv), as PEFT's LoRA conv layers store them.
    """

    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None  # DoRA only: [out], PEFT's lora_magnitude_vector

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class AdapterLayer(nn.Module):
    """A frozen base layer plus a trainable update; `forward` = the adapted layer."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)

    def lora_delta(self) -> LoraDelta:
        """The update as an exact LoRA pair (float32, on the base's device)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW (for tests and merging): B·A in the base weight's shape, float32."""
        d = self.lora_delta()
        if d.A.dim() == 2:
            return d.B @ d.A
        # Conv: ΔW[o, i, *k] = Σ_r B[o, r] · A[r, i, *k]
        return torch.einsum("or,r...->o...", d.B.flatten(1), d.A)


def kaiming_lora_A(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A LoRA down-projection A [r, in] (conv: [r, in/groups, *kernel]) as PEFT initialises lora_A:
    nn.Linear's Kaiming-uniform with a = √5, i.e. U(−1/√fan_in, 1/√fan_in) (Hu et al. 2021, arXiv 2106.09685).

    Drawn on the CPU from the run's generator, in the adapter's dtype, one layer after another in
    the order of the targeted layers: lora, dora-peft and dora then start from bitwise the same A
    under one --seed, on any device.
    """
    a = torch.empty(shape, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


# factory(base layer, rank, alpha, method config, generator) -> AdapterLayer. `alpha` is the LoRA
# scaling numerator (update scaled by alpha / rank); methods without a LoRA pair ignore it.
LayerFactory = Callable[[nn.Module, int, float, Any, torch.Generator], AdapterLayer]


@dataclass
class AdaptedModel:
    """What a method's build returns: the model to train, and the exact export of its updates."""

    model: nn.Module  # the base model with adapters attached (or a PeftModel for PEFT-native methods)
    deltas: Callable[[], dict[str, LoraDelta]]  # layer path in the base model -> its exact LoRA export
    use_dora: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class AdaptContext:
    """What a build may need besides the layers: the seed, and data for data-aware inits."""

    generator: torch.Generator
    # Runs the model forward on a few training batches (CorDA collects activation covariances).
    run_calibration: Callable[[nn.Module], None] | None = None


def layerwise(factory: LayerFactory) -> Callable[..., AdaptedModel]:
    """Turn a per-layer factory into a method build: wrap every targeted layer in place.

    Every method's build: build(model, layers {path: module}, rank, alpha, config, context) -> AdaptedModel
    """

    def build(model: nn.Module, layers: dict[str, nn.Module], rank: int, alpha: float, config: Any,
              context: AdaptContext) -> AdaptedModel:
        model.requires_grad_(False)
        wrapped: dict[str, AdapterLayer] = {}
        for path, module in layers.items():
            wrapped[path] = factory(module, rank, alpha, config, context.generator)
            model.set_submodule(path, wrapped[path])
        return AdaptedModel(model, lambda: {path: layer.lora_delta() for path, layer in wrapped.items()},
                            use_dora=any(isinstance(layer, DoraExport) for layer in wrapped.values()))

    build.factory = factory  # tests reach the per-layer factory through the registered build
    return build


class DoraExport:
    """Mixin marking adapter layers whose export carries a DoRA magnitude."""


def _default_samples(config: Any) -> int:
    return 16


@dataclass(frozen=True, kw_only=True)
class AdapterMethod(Method):
    """An adapt method: `attach` wraps the targeted layers and returns what trains and how it exports.

    attach(model, layers {path: module}, rank, alpha, config, context) -> AdaptedModel
    """

    verb: ClassVar[str] = "adapt"
    attach: Callable[[nn.Module, dict[str, nn.Module], int, float, Any, AdaptContext], AdaptedModel]
    default_lr: float  # used when --lr is not given (singular-value methods need larger steps)
    adapts_experts: bool = False  # can target 3-D expert parameters (PEFT target_parameters)
    # Training sequences the pipeline runs through `context.run_calibration` (data-aware inits).
    calibration_samples: Callable[[Any], int] = _default_samples

    def describe(self) -> dict[str, Any]:
        return {"default_lr": self.default_lr}
