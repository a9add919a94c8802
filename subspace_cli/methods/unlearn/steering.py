"""Activation-steering unlearning: RMU and its subspace-guided form SSPU.

rmu (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218): with h_l the output of block l,
    L = ‖h_l(forget) − c·u‖² + α·‖h_l(retain) − h_l^frozen(retain)‖²   (means over tokens and features)
u a fixed random unit vector, c the steering coefficient; only a few weights writing into the residual
stream train: by default the MLP output projections, plus the gain of the norm that blocks like
Gemma 2/3 and OLMo 2 apply to the MLP output (architecture.py says why and how it is detected).

sspu ("Model Unlearning via Sparse Autoencoder Subspace Guided Projections", arXiv 2505.24428): a
TopK SAE is trained on h_l; features whose activations separate forget from retain give the
"relevant" subspace, features unrelated to the forget set the "irrelevant" one (orthonormal bases
by QR of their decoder directions). The same loss with u drawn inside the irrelevant span, and
every weight update confined to the relevant span: ΔW = Q_rel·C for each trained W [d, ·].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from subspace_cli.errors import UsageError
from subspace_cli.methods.registry import Needs, register
from subspace_cli.methods.unlearn.architecture import Choice, choose_targets, update_blocks, writes_residual
from subspace_cli.methods.unlearn.base import (UnlearnConfig, UnlearnData, UnlearnMethod, UnlearnPlan, default_layer,
                                               frozen_activations, layer_output)

MODULES_HELP = ("regex: which Linear layers (also norm gains, 3-D expert parameters) of those blocks train; default "
                "per block layout: the MLP output projection, plus the gain of a norm applied to the MLP output "
                "(Gemma 2/3, OLMo 2); experts only when named")
NORM_HELP = ("which token norm of h_l(forget) c is relative to; default: the mean where the updated blocks add their "
             "MLP output as it is (as tuned on SmolLM2), the median where a norm follows the MLP")


class RMUConfig(UnlearnConfig):
    # c = steering_scale × a token norm of h_l(forget), so c follows the model's own residual-stream scale.
    # The scale was tuned on SmolLM2-135M (benchmarks/RESULTS.md); post-norm blocks: unlearn_architectures.py.
    default_scale: ClassVar[float] = 4.0

    modules: str | None = Field(None, description=MODULES_HELP)
    steering_coef: float | None = Field(
        None, gt=0, description="c: norm of the control vector; default steering_scale × a token norm of h_l(forget)")
    steering_scale: float | None = Field(None, gt=0, description="c relative to that token norm (steering_norm), when "
                                                                 "steering_coef is not given; default 4")
    steering_norm: Literal["mean", "median"] | None = Field(None, description=NORM_HELP)
    retain_weight: float = Field(1000.0, ge=0, description="α: weight of the retain activation MSE")
    # Measured on SmolLM2-135M (benchmarks/RESULTS.md): 5e-5, the WMDP recipe's rate for 7B models,
    # moves held-out forget perplexity by 3% in 60 steps; 1e-3 with α = 1000 multiplies it by hundreds.
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")


class SSPUConfig(RMUConfig):
    default_scale: ClassVar[float] = 8.0

    # Updates confined to the relevant span need a wider span and a larger step than rmu's free updates:
    # 32 features at 1e-2 raised forget perplexity 5×, 128 features at 3e-3 (c = 8× the norm) 300×.
    relevant: int = Field(128, ge=1, description="SAE features spanning the relevant subspace (updates live there)")
    irrelevant: int = Field(32, ge=1, description="SAE features spanning the irrelevant subspace (the control vector lives there)")
    sae_features: int | None = Field(None, ge=1, description="SAE dictionary size (default 8 × hidden size)")
    sae_k: int = Field(32, ge=1, description="SAE active features per token (TopK)")
    sae_steps: int = Field(600, ge=1, description="SAE training steps")
    steering_scale: float | None = Field(None, gt=0, description="c relative to that token norm (steering_norm), when "
                                                                 "steering_coef is not given; default 8")
    retain_weight: float = Field(100.0, ge=0, description="α: weight of the retain activation MSE")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (of the coefficients C in W + Q_rel·C)")


def _steering_setup(model, data: UnlearnData, config: RMUConfig, layer: int):
    """Frozen retain targets [n_r, L, d] and forget activations [n_f, L, d] of block `layer` (before any update)."""
    retain_targets = frozen_activations(model, layer, data.retain, config.batch_size)
    forget_acts = frozen_activations(model, layer, data.forget, config.batch_size)
    return retain_targets, forget_acts


def _steering_loss(model, data: UnlearnData, layer: int, control: torch.Tensor, retain_targets: torch.Tensor,
                   retain_weight: float):
    def loss(forget_rows, retain_rows):
        forget = layer_output(model, layer, data.forget[forget_rows]).float()  # [B, L, d]
        forget_term = (forget - control).pow(2).mean()
        retain = layer_output(model, layer, data.retain[retain_rows]).float()
        retain_term = (retain - retain_targets[retain_rows]).pow(2).mean()
        return forget_term + retain_weight * retain_term, {"forget_mse": forget_term.item(), "retain_mse": retain_term.item()}

    return loss


def _targets(model, data: UnlearnData, config: RMUConfig, layer: int) -> Choice:
    # Two retain rows are enough to see how each update block uses its MLP output (a no-grad probe).
    return choose_targets(model, config.modules, update_blocks(model, config.update_layers, layer), data.retain[:2])


def _coefficient(config: RMUConfig, forget_acts: torch.Tensor, choice: Choice) -> tuple[float, dict]:
    """c = scale × a token norm of h_l on the forget rows [n_f, L, d]; and what was used, for the report.

    Where a norm follows the MLP (Gemma, OLMo 2), the median token: large models carry a few tokens of
    massive norm, most often the first position (Sun et al. 2024, "Massive activations in large language
    models", arXiv 2402.17762), and with a BOS opening every row they would set a mean, and with it c, far
    above a typical token's norm. Llama-style blocks keep the mean the defaults were tuned with (SmolLM2:
    bitwise the same c as before)."""
    if config.steering_coef is not None:
        return float(config.steering_coef), {}
    scale = config.steering_scale if config.steering_scale is not None else config.default_scale
    statistic = config.steering_norm or ("median" if choice.normalised else "mean")
    norms = forget_acts.float().norm(dim=-1)  # [n_f, L]
    typical = float(norms.median() if statistic == "median" else norms.mean())
    return scale * typical, {"steering_scale": scale, "steering_norm": statistic, "forget_token_norm": typical}


def _diagnostics(layer: int, coef: float, used: dict, choice: Choice) -> dict:
    return {"layer": layer, "steering_coef": coef, **used,
            "block_layout": [layout.summary() for layout in choice.layouts],
            "targets": [{"name": t.name, "why": t.why, "step": t.step} for t in choice.targets]}


def _trainable(model, choice: Choice) -> tuple[list[torch.nn.Parameter], Callable[[], None]]:
    """Freeze the model; the targets train (a gain with step k as W₀ + k·Δ). (params, finish)."""
    from subspace_cli.methods.unlearn.subspaces import bake, scaled_updates

    for p in model.parameters():
        p.requires_grad_(False)
    params, scaled = [], []
    for target in choice.targets:
        if target.step == 1.0:
            target.tensor.requires_grad_(True)
            params.append(target.tensor)
        else:
            params.append(scaled_updates(target.module, target.param, target.step))
            scaled.append(target)

    def finish():
        for target in scaled:
            bake(target.module, target.param)

    return params, finish


def build_rmu(model, data: UnlearnData, config: RMUConfig, generator: torch.Generator) -> UnlearnPlan:
    layer = default_layer(model, config)
    choice = _targets(model, data, config, layer)
    retain_targets, forget_acts = _steering_setup(model, data, config, layer)
    coef, used = _coefficient(config, forget_acts, choice)
    # The WMDP recipe: u uniform in [0, 1)^d, normalised, times c.
    u = torch.rand(forget_acts.shape[-1], generator=generator)
    control = coef * u / u.norm()  # [d]
    params, finish = _trainable(model, choice)
    return UnlearnPlan(params=params, targeted=[t.name for t in choice.targets], notes=choice.notes, finish=finish,
                       loss=_steering_loss(model, data, layer, control, retain_targets, config.retain_weight),
                       diagnostics=_diagnostics(layer, coef, used, choice))


def build_sspu(model, data: UnlearnData, config: SSPUConfig, generator: torch.Generator) -> UnlearnPlan:
    from subspace_cli.methods.unlearn.sae import SAEConfig, train_sae
    from subspace_cli.methods.unlearn.subspaces import (bake, control_vector, orthonormal_basis, restrict_updates,
                                                        select_features)

    layer = default_layer(model, config)
    choice = _targets(model, data, config, layer)
    retain_targets, forget_acts = _steering_setup(model, data, config, layer)
    d = forget_acts.shape[-1]
    for target in choice.targets:
        if not writes_residual(target, d):
            raise UsageError(f"sspu confines updates to a subspace of the residual stream, so the trained weights must "
                             f"write into it ([{d}, ·] weights, [{d}] gains, [E, {d}, ·] experts); {target.name} has "
                             f"{tuple(target.tensor.shape)}: use -O modules matching output projections "
                             "(mlp.down_proj, self_attn.o_proj)")
    forget_tokens = forget_acts.reshape(-1, d).float()
    retain_tokens = retain_targets.reshape(-1, d).float()
    fit = train_sae(torch.cat([forget_tokens, retain_tokens]),
                    SAEConfig(features=config.sae_features, k=config.sae_k, steps=config.sae_steps), generator)
    selection = select_features(fit.sae, forget_tokens, retain_tokens, config.relevant, config.irrelevant)
    decoder = fit.sae.decoder.detach()  # [F, d]
    relevant = orthonormal_basis(decoder[selection.relevant])  # [d, r_rel]
    irrelevant = orthonormal_basis(decoder[selection.irrelevant])  # [d, r_irr]
    coef, used = _coefficient(config, forget_acts, choice)
    control = control_vector(irrelevant, coef, generator)  # [d], inside span(irrelevant)
    # Freeze everything, then replace each target's training by C in W + Q_rel·C (a gain g [d]: g + Q_rel·c).
    # A gain's larger step (Target.step) scales Q_rel: the same span, steps k times as far.
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for target in choice.targets:
        basis = relevant.to(target.tensor.dtype)
        params.append(restrict_updates(target.module, basis if target.step == 1.0 else basis * target.step, target.param))

    def finish():
        for target in choice.targets:
            bake(target.module, target.param)

    diagnostics = {
        **_diagnostics(layer, coef, used, choice),
        "sae": {"normalised_mse": fit.normalised_mse, "dead_fraction": fit.dead_fraction,
                "features": int(decoder.shape[0]), "k": config.sae_k, "seconds": fit.seconds},
        "relevant_features": [int(i) for i in selection.relevant],
        "irrelevant_features": [int(i) for i in selection.irrelevant],
        "relevant_rank": int(relevant.shape[1]), "irrelevant_rank": int(irrelevant.shape[1]),
        "relevant_basis": relevant, "irrelevant_basis": irrelevant, "control": control,  # tensors: for tests, not reported
    }
    return UnlearnPlan(params=params, targeted=[t.name for t in choice.targets], finish=finish, diagnostics=diagnostics,
                       notes=choice.notes,
                       loss=_steering_loss(model, data, layer, control, retain_targets, config.retain_weight))


register(UnlearnMethod(name="rmu", config_class=RMUConfig, plan=build_rmu,
                paper="Li et al. 2024 (WMDP), arXiv 2403.03218",
                summary="steer forget activations at one layer to a random vector, hold retain activations; "
                        "the MLP output projections (and post-MLP norm gains) of a few blocks train",
                needs={Needs.FORGET_DATA, Needs.RETAIN_DATA}))
register(UnlearnMethod(name="sspu", config_class=SSPUConfig, plan=build_sspu,
                paper="arXiv 2505.24428 (SSPU)",
                summary="RMU guided by a built-in TopK SAE: control vector in the irrelevant feature span, "
                        "weight updates confined to the relevant span",
                needs={Needs.FORGET_DATA, Needs.RETAIN_DATA}))
