"""The compress verb's options, declared once: CLI flags, recipe keys and report fields come from
these fields (help text is each field's description)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from subspace_cli.pipelines.config_paths import DATA, MODEL, OUTPUT
from subspace_cli.pipelines.heal_options import HealOptions
from subspace_cli.pipelines.task_options import TaskOptions


class RunOptions(BaseModel):
    """Options every verb shares."""

    # allow_inf_nan=False: `--lr inf` or `--ratio nan` is a typo, refused before any work.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model is loaded and written in")
    seed: int = Field(0, description="seed for calibration sampling and anything random")
    allow_pickle: bool = Field(False, description="allow loading pickle (.bin) weights; they can run code")


# Shared by the verbs that can spread one model's blocks over several devices (compress, eval).
DEVICES_DESCRIPTION = ("place the model's blocks over several devices in one process, for a model larger than one GPU: "
                       "auto (every visible GPU) or a list, cuda:0,cuda:1; overrides --device")


class CompressConfig(RunOptions, HealOptions, TaskOptions):
    model: Annotated[str, MODEL] = Field(description="model: local directory, cached hub id, or builtin:smollm2-135m / builtin:minilm-l6")
    out: Annotated[str, OUTPUT] = Field(description="output directory (written atomically)")
    method: str = Field("svd-llm", description="compression method (see `subspace methods`)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options as KEY=VALUE (see `subspace methods NAME`)")
    ratio: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of the targeted layers' parameters to remove")
    allocation: Literal["uniform", "global"] = Field(
        "global", description="uniform: same ratio per matrix; global: ranks minimising total whitened loss under one budget")
    normalise: Literal["absolute", "relative"] = Field(
        "relative", description="global allocation: compare absolute whitened losses, or each matrix's fraction of energy lost")
    budget_scope: Literal["model", "type"] = Field(
        "model", description="global allocation: one budget for all matrices, or one per projection type (q_proj, ...)")
    min_rank_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description="global allocation: no matrix gets a rank below this fraction of its uniform-allocation rank "
        "(whitened energy alone under-rates matrices dominated by outlier channels)")
    rank_multiple: int | None = Field(
        None, ge=1,
        description="low-rank methods: every rank a multiple of N, counted in the budget (GEMMs run in tiles: the "
        "remainder of a rank costs a whole tile); default auto: 8 on CPU, 64 on CUDA; 1: any rank")
    dense_if_slower_below: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="low-rank methods: keep matrices dense whose factored pair measures no faster at 1 token on "
        "--device, smallest saving first, while the savings given up stay below this fraction of the targeted "
        "parameters together (other ranks unchanged, so --ratio is missed by at most this; timings kept in "
        "$SUBSPACE_HOME/layer_speed.json); default 0: off, the plan depends on the inputs alone")
    sequential: bool = Field(True, description="fit each block to the activations of the blocks already compressed")
    calib: Annotated[list[str], DATA] = Field(
        # A mix of two domains generalises best of the remedies measured (benchmarks/RESULTS.md).
        default_factory=lambda: ["builtin:shakespeare", "builtin:kjv"],
        description="calibration data: text file, directory of .txt, .jsonl with 'text', builtin:shakespeare, builtin:kjv, "
        "or self (text sampled from the model); several sources are mixed evenly")
    calib_samples: int = Field(64, ge=1, description="number of calibration sequences")
    calib_seqlen: int = Field(256, ge=8, description="tokens per calibration sequence")
    eval: Annotated[list[str] | None, DATA] = Field(None, description="data to score perplexity on (held-out 5% of each); default: the calibration sources")
    eval_seqlen: int = Field(512, ge=8, description="tokens per perplexity window (non-overlapping)")
    eval_chars: int = Field(40000, ge=100, description="characters of held-out text scored per source")
    skip_eval: bool = Field(False, description="skip the before/after perplexity evaluation")
    heal: int | None = Field(
        None, ge=1, description="after compressing, heal for STEPS optimizer steps: train the factors toward the dense "
        "model's next-token distribution (--heal-* options; same format and parameter count; see `subspace heal`)")
    bench: bool = Field(False, description="also measure prefill / decode speed of the output against the input model "
                        "(`subspace bench` with its defaults; loads both once more) and add it to the report")
    targets: str | None = Field(
        None, description="regex: only layers whose dotted path matches (experts: model.layers.N.mlp.experts."
        "gate_up_proj.E; lm_head and the input embedding only when it names them)")
    exclude: str | None = Field(None, description="regex: skip layers whose dotted path matches")
    structure: Literal["2:4"] | None = Field(
        None, description="sparse-dictionary methods: at most 2 nonzeros in every 4 consecutive atoms (same as -O structure=2:4)")
    format: Literal["factored", "dense"] = Field(
        "factored", description="factored (LowRankLinear / DictionaryLinear modules) or plain dense checkpoint")
    fuse_projections: bool = Field(
        True, description="low-rank methods: stack the down factors of layers fed the same input (q/k/v, gate/up) into "
        "one matrix, one GEMM at inference (checkpoint format 4; --no-fuse-projections for readers of format <= 3)")
    shard_size: str = Field("2GB", description="maximum safetensors shard size")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    devices: str | None = Field(None, description=DEVICES_DESCRIPTION)
    overwrite: bool = Field(False, description="replace a non-empty output directory")

    @field_validator("calib", "eval", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is None:
            return None
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
