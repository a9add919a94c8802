"""The heal verb's options (the --heal-* ones are shared with `compress --heal`: heal_options.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from subspace_cli.pipelines.compress_config import RunOptions
from subspace_cli.pipelines.config_paths import DATA, LOCAL, MODEL, OUTPUT
from subspace_cli.pipelines.heal_options import HealOptions, split_commas
from subspace_cli.pipelines.task_options import TaskOptions


class HealConfig(RunOptions, HealOptions, TaskOptions):
    model: Annotated[str, MODEL] = Field(description="compressed checkpoint (written by subspace compress)")
    out: Annotated[str, OUTPUT] = Field(description="output directory (written atomically): the healed checkpoint, same format")
    teacher: Annotated[str | None, MODEL] = Field(
        None, description="the dense model it was compressed from (default: the model in MODEL/recipe.yaml)")
    steps: int = Field(100, ge=1, description="optimizer steps")
    eval: Annotated[list[str] | None, DATA] = Field(
        None, description="data to score perplexity on (held-out 5% of each); default: the healing sources")
    eval_seqlen: int = Field(512, ge=8, description="tokens per perplexity window (non-overlapping)")
    eval_chars: int = Field(40000, ge=100, description="characters of held-out text scored per source")
    eval_every: int = Field(25, ge=0, description="score held-out loss every N steps for the curve (0: only at the end)")
    eval_rows: int = Field(8, ge=0, description="held-out windows of the first --eval source scored for the curve (0: all)")
    save_every: int = Field(0, ge=0, description="write a resumable training checkpoint every N steps (0: never)")
    checkpoint_dir: Annotated[str | None, OUTPUT] = Field(None, description="where training checkpoints go (default: OUT.checkpoints beside --out)")
    resume: Annotated[str | None, LOCAL] = Field(None, description="resume from a training checkpoint directory (a step-N folder, or the checkpoint dir for the latest)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass for the teacher and perplexity")
    shard_size: str = Field("2GB", description="maximum safetensors shard size")
    overwrite: bool = Field(False, description="replace a non-empty output directory")

    @field_validator("eval", mode="before")
    @classmethod
    def _split_eval(cls, value):
        return split_commas(value)
