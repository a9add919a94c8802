"""The unlearn verb's options, declared once: CLI flags, recipe keys and report fields come from
these fields (help text is each field's description)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator

from subspace_cli.pipelines.compress_config import RunOptions
from subspace_cli.pipelines.config_paths import DATA, MODEL, OUTPUT
from subspace_cli.pipelines.task_options import TaskOptions


class UnlearnConfig(RunOptions, TaskOptions):
    model: Annotated[str, MODEL] = Field(description="model: local directory, cached hub id, or builtin:smollm2-135m")
    out: Annotated[str, OUTPUT] = Field(description="output directory (written atomically): the edited checkpoint and its report")
    method: str = Field("rmu", description="unlearning method (see `subspace methods`)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options as KEY=VALUE, e.g. layer=7 (see `subspace methods NAME`)")
    forget: Annotated[str, DATA] = Field(description="text to remove: text file, directory of .txt, .jsonl with 'text', builtin:NAME")
    retain: Annotated[str, DATA] = Field(description="text whose behaviour must be kept (same forms as --forget)")
    eval_forget: Annotated[str | None, DATA] = Field(None, description="held-out text of the forget distribution (default: the last 5% of --forget)")
    eval_retain: Annotated[str | None, DATA] = Field(None, description="held-out retain text (default: the last 5% of --retain)")
    forget_samples: int = Field(64, ge=1, description="forget sequences, sampled from the first 95% of --forget")
    retain_samples: int = Field(64, ge=1, description="retain sequences, sampled from the first 95% of --retain")
    seqlen: int = Field(128, ge=8, description="tokens per training sequence (also the membership-inference windows)")
    eval_seqlen: int = Field(256, ge=8, description="tokens per perplexity window")
    eval_chars: int = Field(20000, ge=100, description="characters of held-out text scored per set")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass when evaluating")
    shard_size: str = Field("2GB", description="maximum safetensors shard size")
    overwrite: bool = Field(False, description="replace a non-empty output directory")

    @field_validator("forget", "retain", "eval_forget", "eval_retain")
    @classmethod
    def _strip(cls, value):
        return value.strip() if isinstance(value, str) else value
