"""Loss-based unlearning baselines on the targeted weights.

ga: gradient ascent on the forget set, L = −CE(forget) (Jang et al. 2023, "Knowledge Unlearning for
Mitigating Privacy Risks in Language Models", arXiv 2210.01504).
grad-diff: ascent on forget, descent on retain, L = −CE(forget) + w·CE(retain) (Liu et al. 2022,
arXiv 2203.12817; the TOFU baseline, Maini et al. 2024, arXiv 2401.06121).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from subspace_cli.evaluate.chunked_logits import causal_lm_loss
from subspace_cli.methods.registry import Needs, register
from subspace_cli.methods.unlearn.architecture import choose_targets, update_blocks
from subspace_cli.methods.unlearn.base import (UnlearnConfig, UnlearnData, UnlearnMethod, UnlearnPlan, default_layer,
                                               targeted_linears, trainable_weights)
from subspace_cli.walk import is_linear_like


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `input_ids` [B, L], logits a chunk of positions at a time
    (recomputed in backward). No MoE router loss: ascent must not push the router off balance."""
    return causal_lm_loss(model, input_ids, router_aux=False)


MODULES_HELP = ("regex: which Linear layers of those blocks train; default per block layout: the Linear that writes "
                "the MLP output into the residual stream (mlp.down_proj; on MoE blocks the shared expert's, else the "
                "attention output projection)")


class GradientAscentConfig(UnlearnConfig):
    modules: str | None = Field(None, description=MODULES_HELP)


class GradDiffConfig(UnlearnConfig):
    modules: str | None = Field(None, description=MODULES_HELP)
    retain_weight: float = Field(1.0, ge=0, description="weight w of the retain cross-entropy")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (the retain term allows a larger one than ga's)")


def _linears(model, data: UnlearnData, config: UnlearnConfig, layer: int) -> dict[str, nn.Module]:
    """`-O modules` when given; else each update block's residual writer, as rmu chooses it (the same
    mlp.down_proj on Llama-style blocks; a MoE block without a dense MLP output uses its shared expert's or
    its attention's output projection). Norm gains are rmu's business: a loss on the logits needs no resize."""
    if config.modules is not None:
        return targeted_linears(model, config, layer)
    choice = choose_targets(model, None, update_blocks(model, config.update_layers, layer), data.retain[:2])
    return {t.name.removesuffix(".weight"): t.module for t in choice.targets
            if t.param == "weight" and is_linear_like(t.module)}


def build_ga(model, data: UnlearnData, config: GradientAscentConfig, generator: torch.Generator) -> UnlearnPlan:
    layer = default_layer(model, config)
    params, names = trainable_weights(model, _linears(model, data, config, layer))

    def loss(forget_rows, retain_rows):
        forget = lm_loss(model, data.forget[forget_rows])
        return -forget, {"forget_ce": forget.item()}

    return UnlearnPlan(params=params, loss=loss, targeted=names, diagnostics={"layer": layer})


def build_grad_diff(model, data: UnlearnData, config: GradDiffConfig, generator: torch.Generator) -> UnlearnPlan:
    layer = default_layer(model, config)
    params, names = trainable_weights(model, _linears(model, data, config, layer))

    def loss(forget_rows, retain_rows):
        forget = lm_loss(model, data.forget[forget_rows])
        retain = lm_loss(model, data.retain[retain_rows])
        return -forget + config.retain_weight * retain, {"forget_ce": forget.item(), "retain_ce": retain.item()}

    return UnlearnPlan(params=params, loss=loss, targeted=names, diagnostics={"layer": layer})


register(UnlearnMethod(name="ga", config_class=GradientAscentConfig, plan=build_ga,
                paper="Jang et al. 2023, arXiv 2210.01504",
                summary="gradient ascent on the forget set's next-token loss", needs={Needs.FORGET_DATA}))
register(UnlearnMethod(name="grad-diff", config_class=GradDiffConfig, plan=build_grad_diff,
                paper="Liu et al. 2022, arXiv 2203.12817",
                summary="ascent on the forget loss, descent on the retain loss", needs={Needs.FORGET_DATA, Needs.RETAIN_DATA}))
