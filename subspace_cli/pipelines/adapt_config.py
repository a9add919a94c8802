"""The adapt verb's options, declared once: CLI flags, recipe keys and report fields come from
these fields (help text is each field's description)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, create_model, field_validator, model_validator

from subspace_cli.pipelines.compress_config import RunOptions
from subspace_cli.pipelines.config_paths import DATA, LOCAL, MODEL, OUTPUT


class AdaptConfig(RunOptions):
    model: Annotated[str, MODEL] = Field(description="model: local directory, cached hub id, or builtin:smollm2-135m")
    out: Annotated[str, OUTPUT] = Field(description="output directory (written atomically): a PEFT adapter, report, and with --merge a merged checkpoint")
    method: str = Field("lora", description="adapter method (see `subspace methods`)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options as KEY=VALUE (see `subspace methods NAME`)")
    data: Annotated[list[str], DATA] = Field(
        default_factory=lambda: ["builtin:kjv"],
        description="training data: text file, directory of .txt, .jsonl (text, alpaca instruction/input/output, or chat "
        "messages), builtin:shakespeare, builtin:kjv; several sources are concatenated")
    format: Literal["auto", "text", "jsonl", "alpaca", "chat"] = Field(
        "auto", description="how to read .jsonl data; auto: from the first record's keys")
    rank: int = Field(16, gt=0, description="adapter rank r (singular vectors for svfit/svft)")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator: updates are scaled by alpha / rank (default: rank)")
    targets: str | None = Field(None, description="regex: adapt only layers whose dotted path matches (default: every Linear of the blocks)")
    exclude: str | None = Field(None, description="regex: skip layers whose dotted path matches")
    steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: the method's, see `subspace methods NAME`)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps before the cosine decay")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: no clipping)")
    seqlen: int = Field(256, ge=8, description="tokens per training sequence")
    packing: bool = Field(True, description="pack examples into full seqlen windows (else one padded row per example)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="training compute precision (bf16: autocast; weights stay fp32)")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward to save memory")
    eval_every: int = Field(25, ge=0, description="evaluate held-out loss every N steps (0: only before and after)")
    eval_rows: int = Field(64, ge=0, description="held-out sequences scored per evaluation (the first N; 0: all)")
    save_every: int = Field(0, ge=0, description="write a resumable training checkpoint every N steps (0: never)")
    checkpoint_dir: Annotated[str | None, OUTPUT] = Field(None, description="where training checkpoints go (default: OUT.checkpoints beside --out)")
    resume: Annotated[str | None, LOCAL] = Field(None, description="resume from a training checkpoint directory (a step-N folder, or the checkpoint dir for the latest)")
    merge: bool = Field(False, description="also write the merged full model to OUT/merged")
    shard_size: str = Field("2GB", description="maximum safetensors shard size of the merged checkpoint")
    overwrite: bool = Field(False, description="replace a non-empty output directory")

    @field_validator("data", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            value = [value]
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]

    @model_validator(mode="after")
    def _data_given(self):
        if not self.data:
            raise ValueError("no training data: pass --data (e.g. builtin:kjv or a .jsonl file)")
        return self

    @property
    def scaling_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


# The training loop's options (pipelines/trainer.py TrainSettings), taken from AdaptConfig's own fields:
# declared once, with the same defaults, bounds and help.
TRAIN_FIELDS = ("steps", "lr", "weight_decay", "warmup_steps", "batch_size", "grad_accum", "max_grad_norm", "precision",
                "gradient_checkpointing", "eval_every", "eval_rows", "save_every", "seed")
TrainOptions = create_model(
    "TrainOptions", __config__=ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False),
    **{name: (AdaptConfig.model_fields[name].annotation, AdaptConfig.model_fields[name]) for name in TRAIN_FIELDS})
