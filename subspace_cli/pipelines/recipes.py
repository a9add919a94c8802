"""Recipes: read either form (recipe_format.py), apply `--set`, resolve references, validate every
step with its verb's config class, all before anything runs (exit 2 on any mistake).

`--set KEY=VALUE` means, for a single-step recipe, a config field (as it always has); for a
pipeline, a var, or with a dot `STEP.FIELD=VALUE`, one field of one step. Values are YAML scalars
or flow collections (`--set steps=3`, `--set data=[a.txt,b.txt]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from subspace_cli.errors import UsageError
from subspace_cli.pipelines.recipe_format import (
    PipelineRecipe, SingleStepRecipe, Step, build, check_keys, config_classes, did_you_mean, unknown,
)
from subspace_cli.pipelines.recipe_refs import Scope, substitute, targets


@dataclass(frozen=True)
class PlannedStep:
    name: str
    verb: str
    config: BaseModel

    @property
    def out(self) -> str | None:
        return getattr(self.config, "out", None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verb": self.verb, "config": self.config.model_dump(mode="json")}


@dataclass(frozen=True)
class Plan:
    source: str
    pipeline: bool  # False: a single-step {verb, config} recipe
    vars: dict[str, Any]
    steps: tuple[PlannedStep, ...]
    overrides: tuple[str, ...] = ()  # the --set pairs, recorded in pipeline.yaml's header

    def to_dict(self) -> dict[str, Any]:
        """The dry-run output: for a single step the shape `subspace run --dry-run` has always printed."""
        if not self.pipeline:
            step = self.steps[0].to_dict()
            return {"ok": True, "verb": step["verb"], "config": step["config"]}
        return {"ok": True, "dry_run": True, "recipe": self.source, "vars": self.vars,
                "steps": [s.to_dict() for s in self.steps]}

    def resolved_recipe(self) -> dict[str, Any]:
        """The pipeline with every reference and default filled in: re-runnable as it is."""
        return {"steps": [s.to_dict() for s in self.steps]}


def read_recipe(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"recipe '{path}' must be a mapping: {{verb, config}} for one step or {{vars, steps}} for a pipeline")
    return data


def load_recipe(path: Path, overrides: list[str]) -> Plan:
    data = read_recipe(path)
    where = f"recipe '{path}'"
    if "steps" in data:
        return _pipeline(data, overrides, where, str(path))
    if "verb" in data:
        return _single_step(data, overrides, where, str(path))
    raise UsageError(f"{where} has neither 'verb' (one step: verb, config) nor 'steps' (a pipeline: vars, steps); "
                     f"top-level keys found: {', '.join(map(str, data)) or 'none'}")


def _single_step(data: dict, overrides: list[str], where: str, source: str) -> Plan:
    from subspace_cli.cli.common import parse_options
    from subspace_cli.cli.options import config_from_cli

    recipe = build(SingleStepRecipe, data, where, "top-level key")
    config_class = config_classes()[recipe.verb]
    check_keys(recipe.config, config_class, f"{where} ({recipe.verb})")
    values = dict(recipe.config)
    sets = parse_options(overrides, "--set")
    check_keys(sets, config_class, f"--set ({recipe.verb} recipe)")
    values.update(sets)
    config = config_from_cli(config_class, values)  # messages name the flag, as on the command line
    return Plan(source, False, {}, (PlannedStep(recipe.verb, recipe.verb, config),))


def _pipeline(data: dict, overrides: list[str], where: str, source: str) -> Plan:
    check_keys(data, PipelineRecipe, where, "top-level key")
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f"{where}: 'steps' must be a non-empty list of {{name, verb, config}} mappings")
    steps = []
    for i, raw in enumerate(raw_steps, 1):
        if not isinstance(raw, dict):
            raise UsageError(f"{where}: step {i} must be a mapping with name, verb and config, not {raw!r}")
        steps.append(build(Step, raw, f"{where}: step {i}", "step key"))
    recipe = build(PipelineRecipe, {**data, "steps": steps}, where, "top-level key")
    names = _step_names(recipe.steps, where)
    var_sets, field_sets = _split_overrides(overrides, recipe, names)

    scope = Scope(vars={**recipe.vars, **var_sets})
    classes = config_classes()
    planned = []
    for i, (name, step) in enumerate(zip(names, recipe.steps)):
        here = f"step '{name}' ({step.verb})"
        scope.current, scope.later = name, names[i + 1:]
        config_class = classes[step.verb]
        raw = {**step.config, **field_sets[name]}
        check_keys(raw, config_class, here)  # typos first: a misspelt key would otherwise look like a missing one
        config = build(config_class, substitute(raw, scope, f"{here} config"), here)
        scope.earlier[name] = config.model_dump(mode="json")
        scope.verbs[name] = step.verb
        planned.append(PlannedStep(name, step.verb, config))
    _check_outputs(planned)
    return Plan(source, True, scope.vars, tuple(planned), tuple(overrides or ()))


def _step_names(steps: list[Step], where: str) -> list[str]:
    names: list[str] = []
    for i, step in enumerate(steps, 1):
        name = step.name or step.verb
        if name in names:
            raise UsageError(f"{where}: steps {names.index(name) + 1} and {i} are both named '{name}'; "
                             "give each step a distinct 'name' (references use it)")
        names.append(name)
    return names


def _split_overrides(pairs: list[str], recipe: PipelineRecipe, names: list[str]):
    """`--set` pairs into var values and per-step field values; unknown vars and steps are exit 2."""
    referenced = {target for step in recipe.steps for target, attr in targets(step.config) if attr is None}
    known = [*recipe.vars, *sorted(referenced - set(recipe.vars))]
    var_sets: dict[str, Any] = {}
    field_sets: dict[str, dict[str, Any]] = {name: {} for name in names}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set '{pair}' is not KEY=VALUE (a var, or STEP.FIELD=VALUE for one step's field)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"--set '{pair}': value is not valid YAML: {str(exc).splitlines()[0]}") from exc
        step, dot, field = key.partition(".")
        if dot:
            if step not in field_sets:
                raise unknown("step", step, names, f"--set '{pair}'")
            field_sets[step][field.replace("-", "_")] = value
        elif key in known:
            var_sets[key] = value
        else:
            hint = did_you_mean(key, known)
            raise UsageError(f"--set '{pair}': unknown var '{key}'{hint}; this pipeline's vars: {', '.join(known) or 'none'} "
                             f"(for one step's field write --set STEP.FIELD=VALUE; steps: {', '.join(names)})")
    return var_sets, field_sets


def _check_outputs(steps: list[PlannedStep]) -> None:
    """Two steps writing one directory would silently replace the first one's output."""
    seen: dict[Path, str] = {}
    for step in steps:
        if step.out is None:
            continue
        path = Path(step.out).expanduser().resolve()
        if path in seen:
            raise UsageError(f"steps '{seen[path]}' and '{step.name}' both write '{step.out}'; give each step its own out")
        seen[path] = step.name


def run_recipe(path: Path, overrides: list[str], dry_run: bool = False):
    """Validate everything first; then the single step's result, or a PipelineResult."""
    from subspace_cli.pipelines.pipeline_run import check_steps, run_plan, runners

    plan = load_recipe(path, overrides)
    if not plan.pipeline:
        if dry_run:
            return plan.to_dict()
        step = plan.steps[0]
        return runners()[step.verb](step.config)
    check_steps(plan)  # each verb's own pre-load checks (method names, options, output dirs), for every step
    if dry_run:
        return plan.to_dict()
    return run_plan(plan)
