"""Versioned report schema. `report.json` is this model dumped; bump SCHEMA_VERSION on any
incompatible change."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# 2: `options` split into `config` (the verb's resolved options) and `method_options` (the method's).
SCHEMA_VERSION = 2


class MatrixReport(BaseModel):
    name: str
    shape: tuple[int, int]  # [out, in]
    kind: Literal["dense", "lowrank", "dictionary"] = "lowrank"
    rank: int | None  # low-rank rank; None otherwise
    atoms: int | None = Field(None, description="dictionary: atoms k (shared with dictionary_of when set)")
    nonzeros: int | None = Field(None, description="dictionary: nonzeros s per output")
    dictionary_of: str | None = Field(None, description="dictionary: the matrix whose dictionary this one shares")
    params_before: int
    params_after: int = Field(description="stored size in parameters; for dictionaries in 16-bit units, positions "
                              "included, a shared dictionary split evenly (docs/format.md)")
    whitened_rel_error: float = Field(description="‖(W−W′)X‖/‖WX‖ over calibration inputs (plain Frobenius without calibration)")
    reference_rel_error: float | None = Field(
        None, description="dictionary: svd-llm's whitened rel. error at the rank storing the same number of parameters")
    energy_kept: float = Field(description="fraction of Σσ² kept in the method's own (whitened/scaled) space")
    tokens: int | None = Field(None, description="MoE expert matrix: calibration tokens the router sent to its expert")
    gram: Literal["routed", "pooled"] | None = Field(
        None, description="MoE expert matrix: fitted with the Gram of its routed tokens, or the pooled Gram of all "
        "the layer's tokens (too few routed tokens, or -O expert_grams=pooled)")
    kept_dense_us: tuple[float, float] | None = Field(
        None, description="kept dense because the factored pair measured no faster for a negligible saving "
        "(--dense-if-slower-below): (dense, factored) µs per call at 1 token on the compress device")


class ParamTotals(BaseModel):
    targeted_before: int
    targeted_after: int
    targeted_ratio_removed: float
    model_before: int
    model_after: int
    model_ratio_removed: float


class PerplexityReport(BaseModel):
    before: float | None = None
    after: float | None = None
    ratio: float | None = None
    n_tokens: int = 0


class AdapterLayerReport(BaseModel):
    name: str
    shape: tuple[int, ...]  # the base weight's shape, [out, in] or [out, in, *kernel]
    trainable: int = Field(description="trainable parameters of this layer's adapter")
    export_rank: int = Field(description="rank of the exact LoRA written for this layer (2r for methods that move W)")


class TrainingReport(BaseModel):
    trainable_params: int
    total_params: int = Field(description="parameters of the base model")
    steps: int
    tokens: int = Field(description="training tokens seen (padding excluded)")
    lr: float
    seconds: float
    data_format: str
    train_rows: int
    eval_rows: int
    resumed_from: int | None = None
    curve: list[dict[str, float]] = Field(default_factory=list, description="per step: step, loss, lr, grad_norm")
    evals: list[dict[str, float]] = Field(default_factory=list, description="held-out step, loss, ppl")


class HealingReport(BaseModel):
    """A healing run (subspace heal, compress --heal): distillation of the compressed model toward its teacher."""

    teacher: str
    loss: str = Field(description="kl, lm or mix")
    data: list[str] = Field(description="healing sources")
    rows: int
    seqlen: int
    steps: int
    lr: float
    seconds: float
    tokens: int
    trainable_params: int
    params_before: int = Field(description="the model's nn.Parameter elements before healing (a dictionary's packed "
                               "positions are buffers: params.model_after counts them too)")
    params_after: int = Field(description="and after: always equal (checked)")
    dictionary_patterns_kept: int = Field(0, description="dictionary layers whose atom positions were checked unchanged")
    resumed_from: int | None = None
    perplexity: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="source -> {dense, compressed, healed} perplexity on its held-out text")
    curve: list[dict[str, float]] = Field(default_factory=list, description="per step: step, loss, lr, grad_norm")
    evals: list[dict[str, float]] = Field(default_factory=list, description="held-out step, loss, ppl")

    def perplexity_report(self, before: dict[str, dict], after: dict[str, dict]) -> dict[str, "PerplexityReport"]:
        """PerplexityReport rows from two perplexity() results per source."""
        return {name: PerplexityReport(before=before[name]["ppl"], after=after[name]["ppl"],
                                       ratio=after[name]["ppl"] / before[name]["ppl"], n_tokens=after[name]["n_tokens"])
                for name in after}


class MergeTensorReport(BaseModel):
    name: str
    shape: tuple[int, ...]
    sparsity: float = Field(description="fraction of exactly-zero entries of the merged task vector (merged − base)")
    sign_conflict: float = Field(description="among entries where two or more task vectors are nonzero, the fraction "
                                 "where they disagree in sign")
    mask_density: float | None = Field(None, description="concrete: fraction kept (binary) or mean (continuous) of the mask")


class MergeReport(BaseModel):
    base: str | None
    models: list[str]
    weights: list[float]
    densities: list[float]
    tensors: list[MergeTensorReport] = Field(default_factory=list)
    perplexity: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="task -> model label ('merged', 'base', each input) -> held-out perplexity")
    specialists: dict[str, str] = Field(default_factory=dict, description="task -> the input model that specialises in it")
    normalised: dict[str, float] = Field(
        default_factory=dict, description="model label -> mean over tasks of its perplexity / the specialist's (1 = specialist level)")
    mask_losses: list[float] = Field(default_factory=list, description="concrete: the objective per training step")


class ChangedTensor(BaseModel):
    name: str
    rel_change: float = Field(description="‖W′ − W‖_F / ‖W‖_F")


class UnlearnReport(BaseModel):
    layer: int
    targeted: list[str] = Field(description="weights the method was allowed to change")
    changed: list[ChangedTensor] = Field(default_factory=list, description="every tensor that differs from the input checkpoint")
    unchanged: int = Field(0, description="tensors bitwise identical to the input checkpoint")
    mia_auc_before: float | None = Field(None, description="loss-based membership AUC, forget rows vs held-out forget rows")
    mia_auc_after: float | None = None
    losses: list[dict[str, float]] = Field(default_factory=list, description="per step: step, loss and its parts")
    diagnostics: dict[str, Any] = Field(default_factory=dict, description="method-specific: steering coefficient, SAE fit, features")


class Report(BaseModel):
    schema_version: int = SCHEMA_VERSION
    tool_version: str
    verb: str
    model: str
    method: str
    config: dict[str, Any] = Field(description="the verb's resolved options, as recipe.yaml holds them")
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="the method's resolved options (-O), defaults included")
    matrices: list[MatrixReport] = Field(default_factory=list)
    params: ParamTotals | None = None
    perplexity: dict[str, PerplexityReport] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None
    output: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    training: TrainingReport | None = None  # adapt
    healing: HealingReport | None = None  # heal, compress --heal
    tasks: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="--tasks: source -> task -> {n, chance, acc: {model: accuracy}}")
    samples: list[dict[str, Any]] = Field(
        default_factory=list, description="greedy continuations of fixed prompts: [{prompt, outputs: {model: text}}]")
    adapters: list[AdapterLayerReport] = Field(default_factory=list)  # adapt
    merge: MergeReport | None = None  # merge
    unlearn: UnlearnReport | None = None  # unlearn
    bench: dict[str, Any] | None = None  # compress --bench: `subspace bench` of the input and the output

    def summary(self) -> dict[str, Any]:
        """The one-object `--json` summary: everything but the per-matrix table."""
        data = self.model_dump(mode="json", exclude={"matrices": True, "adapters": True, "training": {"curve"},
                                                             "merge": {"tensors", "mask_losses"},
                                                             "unlearn": {"losses"}})
        data["ok"] = True
        return data
