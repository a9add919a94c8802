"""`subspace merge CONFIG.yaml`: our own merge file, or a mergekit configuration.

Ours holds MergeConfig fields (`models`, `base`, `method`, `options`, `weights`, `density`, ...).
A mergekit file is recognised by its `merge_method` key and translated for the methods both
tools have, so a pipeline can switch tools without rewriting its configs:

    merge_method: ties          # linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: path/to/base
    models:
      - model: path/to/a
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subspace_cli.errors import UsageError
from subspace_cli.io.yaml_files import read_yaml_mapping
from subspace_cli.methods.catalog import methods_for


def mergekit_methods() -> dict[str, str]:
    """mergekit merge_method -> the registered merge method with its semantics (TensorMerge.mergekit)."""
    return {m.mergekit: name for name, m in methods_for("merge").items() if m.mergekit}


# mergekit options that only change how mergekit computes, not the result.
_MERGEKIT_IGNORED = {"int8_mask"}
_MERGEKIT_GLOBAL = {"normalize", "lambda", "rescale"} | _MERGEKIT_IGNORED
_MERGEKIT_PER_MODEL = {"weight", "density"}
_MERGEKIT_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer", "name", "chat_template"}


def read_merge_file(path: Path) -> dict[str, Any]:
    """MergeConfig values (without `out`) from our YAML or a mergekit YAML."""
    data = read_yaml_mapping(Path(path), "merge config",
                             "our merge fields (models, base, method, ...) or a mergekit config (docs/merge.md)")
    if "merge_method" in data:
        return _from_mergekit(data, path)
    from subspace_cli.pipelines.merge_config import MergeConfig

    unknown = sorted(set(data) - set(MergeConfig.model_fields))
    if unknown:
        raise UsageError(f"merge config '{path}': unknown field '{unknown[0]}'; valid: {', '.join(MergeConfig.model_fields)}")
    return data


def _scalar(value, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"merge config '{path}': {where} must be a number (per-layer gradients are not supported), "
                         f"got {value!r}")
    return float(value)


def _from_mergekit(data: dict, path: Path) -> dict[str, Any]:
    unknown = sorted(set(data) - _MERGEKIT_TOP)
    if unknown:
        hint = " (slices are not supported; merge whole models)" if "slices" in unknown else ""
        raise UsageError(f"mergekit config '{path}': key '{unknown[0]}' is not supported{hint}; "
                         f"supported: {', '.join(sorted(_MERGEKIT_TOP))}")
    method = data["merge_method"]
    counterparts = mergekit_methods()
    if method not in counterparts:
        others = ", ".join(name for name, m in methods_for("merge").items() if m.mergekit is None)
        raise UsageError(f"mergekit config '{path}': merge_method '{method}' has no counterpart here; "
                         f"supported: {', '.join(counterparts)} (or write a subspace merge config for {others})")
    source = data.get("tokenizer_source") or (data.get("tokenizer") or {}).get("source")
    if source not in (None, "base"):
        raise UsageError(f"mergekit config '{path}': tokenizer source '{source}' is not supported; the tokenizer "
                         "is taken from the base model and vocabularies must match")
    base = data.get("base_model")
    defaults = dict(data.get("parameters") or {})
    for key in sorted(set(defaults) - _MERGEKIT_GLOBAL - _MERGEKIT_PER_MODEL):
        raise UsageError(f"mergekit config '{path}': parameter '{key}' is not supported for {method}; "
                         f"supported: {', '.join(sorted(_MERGEKIT_GLOBAL | _MERGEKIT_PER_MODEL))}")
    models, weights, densities = [], [], []
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise UsageError(f"mergekit config '{path}': models[{i}] needs a 'model' key")
        if base is not None and entry["model"] == base:
            continue  # mergekit lets the base appear among the models; its task vector is zero
        params = {**{k: v for k, v in defaults.items() if k in _MERGEKIT_PER_MODEL}, **(entry.get("parameters") or {})}
        for key in sorted(set(params) - _MERGEKIT_PER_MODEL):
            raise UsageError(f"mergekit config '{path}': models[{i}] parameter '{key}' is not supported; "
                             f"supported: {', '.join(sorted(_MERGEKIT_PER_MODEL))}")
        models.append(_model_ref(entry["model"]))
        weights.append(_scalar(params.get("weight", 1.0), f"models[{i}].weight", path))
        densities.append(_scalar(params.get("density", 1.0), f"models[{i}].density", path))
    options = {key: value for key, value in defaults.items() if key in _MERGEKIT_GLOBAL - _MERGEKIT_IGNORED}
    values: dict[str, Any] = {"method": counterparts[method], "models": models, "weights": weights,
                              "density": densities, "options": options}
    if base is not None:
        values["base"] = _model_ref(base)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        values["dtype"] = dtype
    return values


def _model_ref(ref) -> str:
    # mergekit's "model+lora" names a LoRA applied to a model; here a LoRA input is applied to --base.
    if not isinstance(ref, str):
        raise UsageError(f"model reference {ref!r} must be a string")
    if "+" in ref:
        raise UsageError(f"model '{ref}': mergekit's 'model+lora' form is not supported; list the LoRA adapter "
                         "directory as a model and its base model as base_model")
    return ref
