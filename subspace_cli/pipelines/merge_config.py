"""The merge verb's options, declared once: CLI flags, recipe keys and report fields come from
these fields (help text is each field's description)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from subspace_cli.pipelines.compress_config import RunOptions
from subspace_cli.pipelines.config_paths import DATA, MODEL, OUTPUT, TASK_DATA
from subspace_cli.pipelines.task_options import TaskOptions


def _split_commas(value):
    if value is None:
        return None
    if isinstance(value, (str, int, float)):
        value = [value]
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


# A per-model number: inf / nan would pass as floats and only fail mid-merge.
Finite = Annotated[float, Field(allow_inf_nan=False)]


class MergeConfig(RunOptions, TaskOptions):
    models: Annotated[list[str], MODEL] = Field(
        description="fine-tuned models (directories, cached hub ids, builtin:NAME) or PEFT LoRA adapter directories "
        "(applied to --base); at least two")
    out: Annotated[str, OUTPUT] = Field(description="output directory (written atomically): the merged checkpoint and its report")
    base: Annotated[str | None, MODEL] = Field(None, description="the base model the inputs were fine-tuned from (needed by every method but linear)")
    force_base: bool = Field(
        False, description="apply LoRA adapters to --base even when it is not the base recorded in their "
        "adapter_config.json (base_model_name_or_path) and its weights differ")
    method: str = Field("task-arithmetic", description="merge method (see `subspace methods`)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options as KEY=VALUE, e.g. lambda=0.5 (see `subspace methods NAME`)")
    weights: list[Finite] | None = Field(
        None, description="per-model weights, finite numbers in model order (one value applies to all; default 1)")
    density: list[Finite] | None = Field(
        None, description="per-model density in (0, 1] for ties / dare (one value applies to all; default 1)")
    data: Annotated[list[str], DATA] = Field(
        default_factory=list,
        description="concrete: unlabeled text per task, one source per model in model order (text file, .jsonl, builtin:NAME)")
    samples: int = Field(16, ge=1, description="concrete: sequences sampled per task")
    seqlen: int = Field(128, ge=8, description="concrete: tokens per sequence")
    eval: Annotated[list[str], TASK_DATA] = Field(
        default_factory=list,
        description="TASK=SOURCE pairs: score held-out perplexity of the merge, the base and every input on each; "
        "the i-th pair is the i-th model's task (its specialist) when there is one pair per model")
    eval_seqlen: int = Field(256, ge=8, description="tokens per perplexity window")
    eval_chars: int = Field(20000, ge=100, description="characters of held-out text scored per task")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass (evaluation, concrete)")
    shard_size: str = Field("2GB", description="maximum safetensors shard size, e.g. 500MB, 2GB")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the written tensors (auto: each tensor's dtype in the base); math runs in float32")
    overwrite: bool = Field(False, description="replace a non-empty output directory")

    @field_validator("models", "data", "eval", mode="before")
    @classmethod
    def _split_lists(cls, value):
        return _split_commas(value) or []

    @field_validator("weights", "density", mode="before")
    @classmethod
    def _split_numbers(cls, value):
        return _split_commas(value)
