"""The healing options `subspace heal` and `subspace compress --heal STEPS` share: declared once, so
both take the same --heal-* flags with the same defaults and help. Imports no torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from subspace_cli.pipelines.config_paths import DATA


def split_commas(value):
    """A list option given as one comma-separated string, several strings, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


class HealOptions(BaseModel):
    """How healing trains: shared by `subspace heal` and `subspace compress --heal`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    heal_loss: Literal["kl", "lm", "mix"] = Field(
        "kl", description="healing loss: kl (KL divergence to the dense teacher's next-token distribution), lm (the "
        "text's next-token cross-entropy), mix (their mean)")
    heal_data: Annotated[list[str] | None, DATA] = Field(
        None, description="healing text (sampled from the first 95% of each source; self: text sampled from the "
        "teacher); default: the calibration sources")
    heal_samples: int | None = Field(
        None, ge=1, description="healing sequences (default: steps × --heal-batch-size, each seen once)")
    heal_seqlen: int = Field(256, ge=8, description="tokens per healing sequence")
    heal_batch_size: int = Field(8, ge=1, description="healing sequences per optimizer step")
    heal_lr: float = Field(1e-4, gt=0, description="peak learning rate of healing (warmup 10% of steps, cosine decay)")
    heal_top_k: int = Field(64, ge=1, description="kl / mix: teacher tokens kept per position (the rest is one bucket)")
    heal_scope: Literal["factors", "all"] = Field(
        "factors", description="what trains: factors (the factored layers' own parameters) or all (also norms, "
        "embeddings, dense layers); the parameter count never changes")

    @field_validator("heal_data", mode="before")
    @classmethod
    def _split_heal_data(cls, value):
        return split_commas(value)
