"""Recipes: read either form (recipe_format.py), apply `--set`, resolve references, validate every
step with its verb's config class, all before anything runs (exit 2 on any mistake).

`--set KEY=VALUE` means, for a single-step recipe, a config field (as it always has); for a
pipeline, a var, or with a dot `STEP.FIELD=VALUE`, one field of one step. Values are YAML scalars
or flow collections (`--set steps=3`, `--set data=[a.txt,b.txt]`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from subspace_cli.errors import UsageError, did_you_mean
from subspace_cli.io.yaml_files import parse_key_value, read_yaml_mapping
from subspace_cli.pipelines.config_paths import absolute_config
from subspace_cli.pipelines.recipe_format import PipelineRecipe, SingleStepRecipe, Step, build, check_keys, unknown
from subspace_cli.pipelines.recipe_refs import Scope, resolve_vars, substitute, targets
from subspace_cli.pipelines.verbs import config_classes


def absolute_recipe(recipe: dict[str, Any], local_roots: Iterable[str | Path] = ()) -> dict[str, Any]:
    """A single-step recipe {verb, config} (or a pipeline step {name, verb, config}), paths absolute."""
    config_class = config_classes()[recipe["verb"]]
    return {**recipe, "config": absolute_config(config_class, recipe["config"], local_roots)}


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
        """The pipeline with every reference and default filled in, local paths absolute: re-runnable
        as it is, from any directory. Every step's output counts as local before it exists."""
        outputs = [s.out for s in self.steps if s.out is not None]
        return {"steps": [absolute_recipe(s.to_dict(), outputs) for s in self.steps]}


FORMS = "{verb, config} for one step or {vars, steps} for a pipeline (docs/recipes.md)"


def read_recipe(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        inside = path / "recipe.yaml"
        hint = (f"; did you mean '{inside}' (the recipe of the run that wrote it)?" if inside.is_file()
                else "; pass a recipe file")
        raise UsageError(f"recipe '{path}' is a directory{hint}")
    return read_yaml_mapping(path, "recipe", FORMS)


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
    recipe = build(SingleStepRecipe, data, where, "top-level key")
    config_class = config_classes()[recipe.verb]
    here = f"{where} ({recipe.verb})"
    check_keys(recipe.config, config_class, here)
    values = dict(recipe.config)
    for pair in overrides or []:
        key, value = parse_key_value(pair, "--set", f"FIELD=VALUE for a {recipe.verb} field, e.g. --set out=DIR")
        check_keys({key.replace("-", "_"): value}, config_class, f"--set '{pair}' ({recipe.verb} recipe)")
        values[key.replace("-", "_")] = value
    config = build(config_class, values, here)  # messages name the recipe field; the command line names flags
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

    scope = Scope(vars=resolve_vars({**recipe.vars, **var_sets}, where))
    classes = config_classes()
    planned = []
    for i, (name, step) in enumerate(zip(names, recipe.steps)):
        here = f"{where} step '{name}' ({step.verb})"
        scope.current, scope.later = name, names[i + 1:]
        config_class = classes[step.verb]
        raw = {**step.config, **field_sets[name]}
        check_keys(raw, config_class, here)  # typos first: a misspelt key would otherwise look like a missing one
        config = build(config_class, substitute(raw, scope, f"{here} config"), here)
        scope.earlier[name] = config.model_dump(mode="json")
        scope.verbs[name] = step.verb
        planned.append(PlannedStep(name, step.verb, config))
    _check_outputs(planned, where)
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
    everywhere = [recipe.vars, *(step.config for step in recipe.steps)]  # vars may use vars
    referenced = {target for target, attr in targets(everywhere) if attr is None}
    known = [*recipe.vars, *sorted(referenced - set(recipe.vars))]
    var_sets: dict[str, Any] = {}
    field_sets: dict[str, dict[str, Any]] = {name: {} for name in names}
    for pair in pairs or []:
        key, value = parse_key_value(pair, "--set", "NAME=VALUE for a var, or STEP.FIELD=VALUE for one step's field")
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


def _check_outputs(steps: list[PlannedStep], where: str) -> None:
    """Two steps writing one directory would silently replace the first one's output."""
    seen: dict[Path, str] = {}
    for step in steps:
        if step.out is None:
            continue
        path = Path(step.out).expanduser().resolve()
        if path in seen:
            raise UsageError(f"{where}: steps '{seen[path]}' and '{step.name}' both write '{step.out}'; "
                             "give each step its own out")
        seen[path] = step.name
