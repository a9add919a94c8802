"""Recipes: `{verb: NAME, config: {...}}` YAML files, validated by the verb's config model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from subspace_cli.errors import UsageError


def _verbs() -> dict[str, tuple[type, Any]]:
    from subspace_cli.pipelines.adapt import run_adapt
    from subspace_cli.pipelines.adapt_config import AdaptConfig
    from subspace_cli.pipelines.compress import run_compress
    from subspace_cli.pipelines.compress_config import CompressConfig
    from subspace_cli.pipelines.evaluate import EvalConfig, run_eval
    from subspace_cli.pipelines.inspect import InspectConfig, run_inspect
    from subspace_cli.pipelines.merge import run_merge
    from subspace_cli.pipelines.merge_config import MergeConfig
    from subspace_cli.pipelines.unlearn import run_unlearn
    from subspace_cli.pipelines.unlearn_config import UnlearnConfig

    return {
        "compress": (CompressConfig, run_compress),
        "adapt": (AdaptConfig, run_adapt),
        "merge": (MergeConfig, run_merge),
        "unlearn": (UnlearnConfig, run_unlearn),
        "eval": (EvalConfig, run_eval),
        "inspect": (InspectConfig, run_inspect),
    }


def load_recipe(path: Path, overrides: list[str]) -> tuple[str, Any]:
    from subspace_cli.cli.common import parse_options
    from subspace_cli.cli.options import config_from_cli

    if not Path(path).is_file():
        raise UsageError(f"recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict) or "verb" not in data or not isinstance(data.get("config"), dict):
        raise UsageError(f"recipe '{path}' must be a mapping with 'verb' and 'config' keys")
    verbs = _verbs()
    verb = data["verb"]
    if verb not in verbs:
        raise UsageError(f"recipe verb '{verb}' is not supported; valid: {', '.join(verbs)}")
    unknown = set(data) - {"verb", "config"}
    if unknown:
        raise UsageError(f"recipe '{path}' has unknown top-level keys {sorted(unknown)}; valid: verb, config")
    config_class, _ = verbs[verb]
    values = dict(data["config"])
    for key in set(values) - set(config_class.model_fields):
        valid = ", ".join(config_class.model_fields)
        raise UsageError(f"recipe field '{key}' is not a {verb} option; valid: {valid}")
    values.update(parse_options(overrides, "--set"))
    return verb, config_from_cli(config_class, values)


def run_recipe(path: Path, overrides: list[str], dry_run: bool = False):
    verb, config = load_recipe(path, overrides)
    if dry_run:
        return {"ok": True, "verb": verb, "config": config.model_dump(mode="json")}
    return _verbs()[verb][1](config)
