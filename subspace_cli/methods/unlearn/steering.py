"""Activation-steering unlearning: RMU and its subspace-guided form SSPU.

rmu (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218): with h_l the output of block l,
    L = ‖h_l(forget) − c·u‖² + α·‖h_l(retain) − h_l^frozen(retain)‖²   (means over tokens and features)
u a fixed random unit vector, c the steering coefficient; only a few MLP down-projections train.

sspu ("Model Unlearning via Sparse Autoencoder Subspace Guided Projections", arXiv 2505.24428): a
TopK SAE is trained on h_l; features whose activations separate forget from retain give the
"relevant" subspace, features unrelated to the forget set the "irrelevant" one (orthonormal bases
by QR of their decoder directions). The same loss with u drawn inside the irrelevant span, and
every weight update confined to the relevant span: ΔW = Q_rel·C for each trained W [d, ·].
"""

from __future__ import annotations

import torch
from pydantic import Field

from subspace_cli.errors import UsageError
from subspace_cli.methods.registry import Method, register
from subspace_cli.methods.unlearn.base import (
    UnlearnConfig, UnlearnData, UnlearnPlan, default_layer, frozen_activations, layer_output, targeted_linears,
    trainable_weights,
)


class RMUConfig(UnlearnConfig):
    steering_coef: float | None = Field(
        None, gt=0, description="c: norm of the control vector; default steering_scale × the mean norm of h_l on forget tokens")
    steering_scale: float = Field(
        4.0, gt=0, description="c relative to the forget activations' mean norm, when steering_coef is not given")
    retain_weight: float = Field(1000.0, ge=0, description="α: weight of the retain activation MSE")
    # Measured on SmolLM2-135M (benchmarks/RESULTS.md): 5e-5, the WMDP recipe's rate for 7B models,
    # moves held-out forget perplexity by 3% in 60 steps; 1e-3 with α = 1000 multiplies it by hundreds.
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")


class SSPUConfig(RMUConfig):
    # Updates confined to the relevant span need a wider span and a larger step than rmu's free updates:
    # 32 features at 1e-2 raised forget perplexity 5×, 128 features at 3e-3 (c = 8× the norm) 300×.
    relevant: int = Field(128, ge=1, description="SAE features spanning the relevant subspace (updates live there)")
    irrelevant: int = Field(32, ge=1, description="SAE features spanning the irrelevant subspace (the control vector lives there)")
    sae_features: int | None = Field(None, ge=1, description="SAE dictionary size (default 8 × hidden size)")
    sae_k: int = Field(32, ge=1, description="SAE active features per token (TopK)")
    sae_steps: int = Field(600, ge=1, description="SAE training steps")
    steering_scale: float = Field(
        8.0, gt=0, description="c relative to the forget activations' mean norm, when steering_coef is not given")
    retain_weight: float = Field(100.0, ge=0, description="α: weight of the retain activation MSE")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (of the coefficients C in W + Q_rel·C)")


def _steering_setup(model, data: UnlearnData, config: RMUConfig, layer: int):
    """Frozen retain targets [n_r, L, d] and the forget activations' mean token norm (before any update)."""
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


def _coefficient(config: RMUConfig, forget_acts: torch.Tensor) -> float:
    if config.steering_coef is not None:
        return float(config.steering_coef)
    return config.steering_scale * float(forget_acts.float().norm(dim=-1).mean())


def build_rmu(model, data: UnlearnData, config: RMUConfig, generator: torch.Generator) -> UnlearnPlan:
    layer = default_layer(model, config)
    layers = targeted_linears(model, config, layer)
    retain_targets, forget_acts = _steering_setup(model, data, config, layer)
    coef = _coefficient(config, forget_acts)
    # The WMDP recipe: u uniform in [0, 1)^d, normalised, times c.
    u = torch.rand(forget_acts.shape[-1], generator=generator)
    control = coef * u / u.norm()  # [d]
    params, names = trainable_weights(model, layers)
    return UnlearnPlan(params=params, targeted=names,
                       loss=_steering_loss(model, data, layer, control, retain_targets, config.retain_weight),
                       diagnostics={"layer": layer, "steering_coef": coef})


def build_sspu(model, data: UnlearnData, config: SSPUConfig, generator: torch.Generator) -> UnlearnPlan:
    from subspace_cli.methods.unlearn.sae import SAEConfig, train_sae
    from subspace_cli.methods.unlearn.subspaces import (
        bake, control_vector, orthonormal_basis, restrict_updates, select_features,
    )

    layer = default_layer(model, config)
    layers = targeted_linears(model, config, layer)
    retain_targets, forget_acts = _steering_setup(model, data, config, layer)
    d = forget_acts.shape[-1]
    for path, module in layers.items():
        if module.weight.shape[0] != d:
            raise UsageError(f"sspu confines updates to a subspace of the residual stream, so the trained layers must "
                             f"write into it ([{d}, ·] weights); {path} has {tuple(module.weight.shape)}: "
                             "use -O modules matching output projections (mlp.down_proj, self_attn.o_proj)")
    forget_tokens = forget_acts.reshape(-1, d).float()
    retain_tokens = retain_targets.reshape(-1, d).float()
    fit = train_sae(torch.cat([forget_tokens, retain_tokens]),
                    SAEConfig(features=config.sae_features, k=config.sae_k, steps=config.sae_steps), generator)
    selection = select_features(fit.sae, forget_tokens, retain_tokens, config.relevant, config.irrelevant)
    decoder = fit.sae.decoder.detach()  # [F, d]
    relevant = orthonormal_basis(decoder[selection.relevant])  # [d, r_rel]
    irrelevant = orthonormal_basis(decoder[selection.irrelevant])  # [d, r_irr]
    coef = _coefficient(config, forget_acts)
    control = control_vector(irrelevant, coef, generator)  # [d], inside span(irrelevant)
    # Freeze everything, then replace each targeted weight's training by C in W + Q_rel·C.
    trainable_weights(model, layers)
    params = []
    for module in layers.values():
        module.weight.requires_grad_(False)
        params.append(restrict_updates(module, relevant.to(module.weight.dtype)))

    def finish():
        for module in layers.values():
            bake(module)

    diagnostics = {
        "layer": layer, "steering_coef": coef,
        "sae": {"normalised_mse": fit.normalised_mse, "dead_fraction": fit.dead_fraction,
                "features": int(decoder.shape[0]), "k": config.sae_k, "seconds": fit.seconds},
        "relevant_features": [int(i) for i in selection.relevant],
        "irrelevant_features": [int(i) for i in selection.irrelevant],
        "relevant_rank": int(relevant.shape[1]), "irrelevant_rank": int(irrelevant.shape[1]),
        "relevant_basis": relevant, "irrelevant_basis": irrelevant, "control": control,  # tensors: for tests, not reported
    }
    return UnlearnPlan(params=params, targeted=[f"{p}.weight" for p in layers], finish=finish, diagnostics=diagnostics,
                       loss=_steering_loss(model, data, layer, control, retain_targets, config.retain_weight))


register(Method(name="rmu", verb="unlearn", config_class=RMUConfig, build=build_rmu,
                paper="Li et al. 2024 (WMDP), arXiv 2403.03218",
                summary="steer forget activations at one layer to a random vector, hold retain activations; "
                        "a few MLP down-projections train",
                needs=("forget data", "retain data")))
register(Method(name="sspu", verb="unlearn", config_class=SSPUConfig, build=build_sspu,
                paper="arXiv 2505.24428 (SSPU)",
                summary="RMU guided by a built-in TopK SAE: control vector in the irrelevant feature span, "
                        "weight updates confined to the relevant span",
                needs=("forget data", "retain data")))
