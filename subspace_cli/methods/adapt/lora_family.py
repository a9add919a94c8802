"""LoRA and its SVD-initialised relatives, trained as PEFT LoRA layers.

- `lora`: B·A with A Kaiming-uniform, B = 0 (Hu et al. 2021, arXiv 2106.09685).
- `pissa`: A, B from the top-r singular triplets, W_res = W − s·B₀A₀ (Meng et al. 2024, arXiv 2404.02948).
- `milora`: as PiSSA from the *smallest* r triplets (Wang et al. 2024, arXiv 2406.09044).
- `olora`: A, B from a QR of W (Büyükakyüz 2024, arXiv 2406.01775).
- `corda`: A, B from the SVD of W·C, C the activation covariance (Yang et al. 2024, arXiv 2406.05223).
- `dora-peft`: PEFT's DoRA, for comparison with the factored-norm `dora` (Liu et al. 2024, arXiv 2402.09353).

Methods that move the base weight (pissa, milora, olora, corda) export exactly on the untouched
base as a rank-2r LoRA:  W_res + s·B·A = W + s·(B·A − B₀·A₀)  =>  B′ = s·[B, −B₀], A′ = [A; A₀].
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.methods.adapt.base import AdaptContext, AdaptedModel, AdapterMethod, LoraDelta, kaiming_lora_A
from subspace_cli.methods.adapt.experts import param_wrapper, unpack
from subspace_cli.methods.registry import MethodConfig, Needs, register
from subspace_cli.walk import ExpertStack

DEFAULT_LR = 2e-4  # LoRA's usual step size; every method here trains an A·B pair of the same scale


class LoraConfig(MethodConfig):
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (PEFT lora_dropout)")


# One config class per method (the registry is keyed by it); these add no options to LoRA's.
class MiloraConfig(LoraConfig):
    pass


class OloraConfig(LoraConfig):
    pass


class DoraPeftConfig(LoraConfig):
    pass


class PissaConfig(LoraConfig):
    niter: int | None = Field(
        None, ge=1, description="randomised-SVD power iterations for a fast init; none: exact SVD")


class CordaConfig(LoraConfig):
    mode: Literal["ipm", "kpm"] = Field(
        "ipm", description="ipm: adapt the components that matter most to the data; kpm: keep them, adapt the rest")
    samples: int = Field(16, ge=1, description="training sequences run to collect activation covariances")


def _lora_layers(peft_model, layers) -> dict[str, nn.Module]:
    """PEFT's LoRA layer per target: the Linear's wrapper, or an expert stack's ParamWrapper."""
    root = peft_model.base_model.model
    return {path: param_wrapper(root, path) if isinstance(m, ExpertStack) else root.get_submodule(path)
            for path, m in layers.items()}


def _pair(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], s·B [out, r]) in float32 (detached copies)."""
    scaling = layer.scaling["default"]
    return (layer.lora_A["default"].weight.detach().float().clone(),
            layer.lora_B["default"].weight.detach().float() * scaling)


@torch.no_grad()
def _milora_init(layer, rank: int) -> None:
    """MiLoRA: the r smallest singular triplets become the adapter, W_res keeps the rest."""
    weight = layer.get_base_layer().weight
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # [out, m], [m], [m, in]
    scaling = layer.scaling["default"]
    root = (s[-rank:] / scaling).sqrt()
    layer.lora_A["default"].weight.copy_(root[:, None] * vh[-rank:])  # [r, in]
    layer.lora_B["default"].weight.copy_(u[:, -rank:] * root)  # [out, r]
    weight.sub_((scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).to(weight.dtype))


def _peft_build(init: str, moves_base: bool, use_dora: bool = False):
    def build(model: nn.Module, layers: dict[str, nn.Module], rank: int, alpha: float, config: LoraConfig,
              context: AdaptContext) -> AdaptedModel:
        import peft

        fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in layers.values())
        # Expert stacks (3-D parameters) go to PEFT's target_parameters: plain LoRA only, no dropout.
        stacks = [path for path, m in layers.items() if isinstance(m, ExpertStack)]
        if stacks and not build.adapts_experts:
            raise UsageError(f"method '{'dora-peft' if use_dora else init}' adapts Linear layers; experts are 3-D "
                             f"parameters ({stacks[0]}): use --method lora, or --exclude experts")
        if stacks and config.dropout:
            raise UsageError(f"-O dropout={config.dropout:g}: PEFT's LoRA on expert parameters ({stacks[0]}) takes no "
                             "dropout (it cannot drop a parameter's input); pass -O dropout=0, or --exclude experts")
        init_weights: bool | str = {"lora": True, "milora": True}.get(init, init)
        if init == "pissa" and config.niter:
            init_weights = f"pissa_niter_{config.niter}"  # PEFT's spelling of the option
        extra = {}
        if init == "corda":
            extra["corda_config"] = peft.tuners.lora.config.CordaConfig(corda_method=config.mode)
        lora_config = peft.LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=[p for p in layers if p not in stacks],
            target_parameters=stacks or None, lora_dropout=config.dropout,
            init_lora_weights=init_weights, use_dora=use_dora, fan_in_fan_out=fan_in_fan_out, **extra)
        if init == "corda":
            if context.run_calibration is None:
                raise UsageError("corda needs training data to collect activation covariances")
            from peft.tuners.lora.corda import preprocess_corda

            preprocess_corda(model, lora_config, run_model=lambda: context.run_calibration(model))
        torch.manual_seed(context.generator.initial_seed())  # PEFT draws its random inits from the global RNG
        peft_model = peft.get_peft_model(model, lora_config)
        lora_layers = _lora_layers(peft_model, layers)
        if init == "lora":
            # PEFT's A comes from the global RNG after as many draws as its version makes when it builds
            # the layers; A is redrawn from the run's generator instead (the same distribution), so that
            # lora, dora-peft and dora start from the same A under one --seed. B stays PEFT's zeros.
            with torch.no_grad():
                for layer in lora_layers.values():
                    weight = layer.lora_A["default"].weight
                    weight.copy_(kaiming_lora_A(tuple(weight.shape), weight.dtype, context.generator))
        if init == "milora":
            for layer in lora_layers.values():
                _milora_init(layer, rank)
        initial = {path: _pair(layer) for path, layer in lora_layers.items()} if moves_base else {}

        def deltas() -> dict[str, LoraDelta]:
            out = {}
            for path, layer in lora_layers.items():
                if path in stacks:  # lora only: every expert's pair, PEFT's packing undone
                    out[path] = unpack(layer)
                    continue
                A, B = _pair(layer)
                if path in initial:
                    A0, B0 = initial[path]
                    A, B = torch.cat([A, A0]), torch.cat([B, -B0], dim=1)
                magnitude = None
                if use_dora:
                    magnitude = layer.lora_magnitude_vector["default"].weight.detach().float().clone()
                out[path] = LoraDelta(A, B, magnitude)
            return out

        notes = [f"{init}: the base weights move during training; the adapter is saved as an exact rank-{2 * rank} "
                 "LoRA on the untouched base"] if moves_base else []
        return AdaptedModel(peft_model, deltas, use_dora=use_dora, notes=notes)

    # PEFT's ParamWrapper takes plain LoRA only (no DoRA; its other inits read a Linear's weight).
    build.adapts_experts = init == "lora" and not use_dora
    return build


_NEEDS = {Needs.TRAINING_DATA}
register(AdapterMethod(name="lora", config_class=LoraConfig, attach=_peft_build("lora", False), adapts_experts=True,
                paper="Hu et al. 2021, arXiv 2106.09685", summary="low-rank update B·A (PEFT LoRA), B = 0 at start",
                needs=_NEEDS, default_lr=DEFAULT_LR))
register(AdapterMethod(name="pissa", config_class=PissaConfig, attach=_peft_build("pissa", True),
                paper="Meng et al. 2024, arXiv 2404.02948",
                summary="adapter initialised from the top-r singular triplets, the residual frozen (PEFT)",
                needs=_NEEDS, default_lr=DEFAULT_LR))
register(AdapterMethod(name="milora", config_class=MiloraConfig, attach=_peft_build("milora", True),
                paper="Wang et al. 2024, arXiv 2406.09044",
                summary="adapter initialised from the smallest r singular triplets (minor components)",
                needs=_NEEDS, default_lr=DEFAULT_LR))
register(AdapterMethod(name="olora", config_class=OloraConfig, attach=_peft_build("olora", True),
                paper="Büyükakyüz 2024, arXiv 2406.01775", summary="adapter initialised from a QR of W (PEFT OLoRA)",
                needs=_NEEDS, default_lr=DEFAULT_LR))
register(AdapterMethod(name="corda", config_class=CordaConfig, attach=_peft_build("corda", True),
                calibration_samples=lambda config: config.samples,
                paper="Yang et al. 2024, arXiv 2406.05223",
                summary="adapter from the SVD of W·C, C the training data's activation covariance (PEFT CorDA)",
                needs=_NEEDS, default_lr=DEFAULT_LR))
register(AdapterMethod(name="dora-peft", config_class=DoraPeftConfig, attach=_peft_build("lora", False, use_dora=True),
                paper="Liu et al. 2024, arXiv 2402.09353", summary="PEFT's DoRA (dense norm), for comparison with dora",
                needs=_NEEDS, default_lr=DEFAULT_LR))
