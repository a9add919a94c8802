"""Loss-based unlearning baselines on the targeted weights.

ga: gradient ascent on the forget set, L = −CE(forget) (Jang et al. 2023, "Knowledge Unlearning for
Mitigating Privacy Risks in Language Models", arXiv 2210.01504).
grad-diff: ascent on forget, descent on retain, L = −CE(forget) + w·CE(retain) (Liu et al. 2022,
arXiv 2203.12817; the TOFU baseline, Maini et al. 2024, arXiv 2401.06121).
"""

from __future__ import annotations

import torch
from pydantic import Field

from subspace_cli.methods.registry import Method, register
from subspace_cli.methods.unlearn.base import (
    UnlearnConfig, UnlearnData, UnlearnPlan, default_layer, lm_loss, targeted_linears, trainable_weights,
)


class GradientAscentConfig(UnlearnConfig):
    pass


class GradDiffConfig(UnlearnConfig):
    retain_weight: float = Field(1.0, ge=0, description="weight w of the retain cross-entropy")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (the retain term allows a larger one than ga's)")


def build_ga(model, data: UnlearnData, config: GradientAscentConfig, generator: torch.Generator) -> UnlearnPlan:
    layer = default_layer(model, config)
    params, names = trainable_weights(model, targeted_linears(model, config, layer))

    def loss(forget_rows, retain_rows):
        forget = lm_loss(model, data.forget[forget_rows])
        return -forget, {"forget_ce": forget.item()}

    return UnlearnPlan(params=params, loss=loss, targeted=names, diagnostics={"layer": layer})


def build_grad_diff(model, data: UnlearnData, config: GradDiffConfig, generator: torch.Generator) -> UnlearnPlan:
    layer = default_layer(model, config)
    params, names = trainable_weights(model, targeted_linears(model, config, layer))

    def loss(forget_rows, retain_rows):
        forget = lm_loss(model, data.forget[forget_rows])
        retain = lm_loss(model, data.retain[retain_rows])
        return -forget + config.retain_weight * retain, {"forget_ce": forget.item(), "retain_ce": retain.item()}

    return UnlearnPlan(params=params, loss=loss, targeted=names, diagnostics={"layer": layer})


register(Method(name="ga", verb="unlearn", config_class=GradientAscentConfig, build=build_ga,
                paper="Jang et al. 2023, arXiv 2210.01504",
                summary="gradient ascent on the forget set's next-token loss", needs=("forget data",)))
register(Method(name="grad-diff", verb="unlearn", config_class=GradDiffConfig, build=build_grad_diff,
                paper="Liu et al. 2022, arXiv 2203.12817",
                summary="ascent on the forget loss, descent on the retain loss", needs=("forget data", "retain data")))
