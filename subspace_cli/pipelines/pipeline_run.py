"""Run a validated pipeline plan: the steps in order, each through its verb's own pipeline.

Every step writes its own output (with its own single-step recipe.yaml, which re-runs that step)
exactly as the verb run alone would. Beside it goes `pipeline.yaml`, the resolved pipeline, which
re-runs them all: written into each step's output directory as soon as the step finishes (eval
and inspect steps have none), so the newest output always says how it was made, even when a
later gate fails. A failing step stops the pipeline with its exit code (1 for a failed gate);
the error names the step, and `--json` lists the steps run so far.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from subspace_cli import lifecycle
from subspace_cli.errors import GateFailed, SubspaceError, UsageError
from subspace_cli.pipelines.recipes import Plan, PlannedStep, load_recipe
from subspace_cli.pipelines.verbs import VERBS

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"


def _inside(path: Path, directories: list[Path]) -> bool:
    path = path.expanduser().resolve()
    return any(path == d or d in path.parents for d in directories)


def _checkable(step: PlannedStep, produced: list[Path]):
    """The step's config minus paths an earlier step has yet to create (they cannot be checked now)."""
    config = step.config
    if step.verb == "inspect" and config.plot and _inside(Path(config.plot).parent, produced):
        return config.model_copy(update={"plot": None})
    if step.verb == "adapt" and config.resume and _inside(Path(config.resume), produced):
        return config.model_copy(update={"resume": None})
    return config


def check_steps(plan: Plan) -> None:
    """Each verb's pre-load checks (method names and options, gate fields, output directories) for
    every step before the first one runs: a mistake in step 4 should not cost steps 1 to 3."""
    produced: list[Path] = []
    for step in plan.steps:
        try:
            VERBS[step.verb].validate(_checkable(step, produced))
        except UsageError as exc:
            named = f"step '{step.name}' ({step.verb})" if plan.pipeline else f"({step.verb})"
            exc.args = (f"recipe '{plan.source}' {named}: {exc}",)
            raise
        if step.out is not None:
            produced.append(Path(step.out).expanduser().resolve())


@dataclass
class StepOutcome:
    step: PlannedStep
    result: Any  # a Report (compress, adapt, merge, unlearn) or a dict (eval, inspect)

    def summary(self) -> dict[str, Any]:
        if hasattr(self.result, "summary"):
            data = self.result.summary()
        else:  # inspect's per-matrix rows are its report, not its summary
            data = {k: v for k, v in self.result.items() if k != "matrices"}
        return {"name": self.step.name, "verb": self.step.verb, "out": self.step.out, "ok": True, "summary": data}


@dataclass
class PipelineResult:
    plan: Plan
    outcomes: list[StepOutcome]
    pipeline_recipe: str | None

    def summary(self) -> dict[str, Any]:
        return {"ok": True, "recipe": self.plan.source, "pipeline_recipe": self.pipeline_recipe,
                "steps": [o.summary() for o in self.outcomes]}


def write_pipeline_recipe(plan: Plan, directory: Path) -> Path:
    path = Path(directory) / PIPELINE_FILE
    # Absolute, like the paths below: the file is read from wherever the user is later.
    header = f"# subspace pipeline, resolved from {Path(plan.source).absolute()}\n"
    if plan.vars:
        header += f"# vars: {json.dumps(plan.vars, default=str)}\n"
    if plan.overrides:
        header += f"# --set: {json.dumps(list(plan.overrides))}\n"
    header += f"# Every reference and default is filled in; re-run with: subspace run {path.absolute()}\n"
    path.write_text(header + yaml.safe_dump(plan.resolved_recipe(), sort_keys=False))
    return path


def run_plan(plan: Plan) -> PipelineResult:
    outcomes: list[StepOutcome] = []
    written: str | None = None
    for i, step in enumerate(plan.steps):
        log.info("step %d/%d '%s': subspace %s", i + 1, len(plan.steps), step.name, step.verb)
        try:
            result = VERBS[step.verb].run(step.config)
        except SubspaceError as exc:
            raise _stopped(exc, plan, step, outcomes, written)
        except KeyboardInterrupt:
            done = ", ".join(o.step.name for o in outcomes) or "none"
            log.warning("interrupted in step '%s'; the outputs of the steps before it are complete: %s", step.name, done)
            raise
        outcomes.append(StepOutcome(step, result))
        if step.out is not None:
            written = str(write_pipeline_recipe(plan, Path(step.out)))
            lifecycle.keep(f"step '{step.name}' output", step.out)  # an interrupt later on names what is complete
        del result
        gc.collect()  # the step's model is garbage now; free it before the next step loads another
    return PipelineResult(plan, outcomes, written)


def _stopped(exc: SubspaceError, plan: Plan, step: PlannedStep, outcomes: list[StepOutcome], written: str | None) -> SubspaceError:
    """The same exception (same class, exit code and failed gates), naming the step, with the
    pipeline's progress as its --json summary."""
    exc.args = (f"step '{step.name}' ({step.verb}): {exc}",)
    partial = getattr(exc, "summary", None)  # eval's full result when its gate failed
    summary: dict[str, Any] = {
        "ok": False, "failed_step": step.name, "pipeline_recipe": written,
        "steps": [o.summary() for o in outcomes]
        + [{"name": step.name, "verb": step.verb, "out": step.out, "ok": False, "summary": partial}],
    }
    if isinstance(exc, GateFailed):
        summary["gates"] = (partial or {}).get("gates", [])  # every condition, failed or not, with its value
    exc.summary = summary
    exc.outcomes, exc.n_steps = outcomes, len(plan.steps)  # for the people-readable rendering of what did run
    return exc


def run_recipe(path: Path, overrides: list[str], dry_run: bool = False):
    """Validate everything first; then the single step's result, or a PipelineResult."""
    lifecycle.add_input("recipe", path)  # no step's output may replace the file that describes the run
    plan = load_recipe(path, overrides)
    check_steps(plan)  # each verb's own pre-load checks (method names, options, output dirs), for every step
    if dry_run:
        return plan.to_dict()
    if not plan.pipeline:
        step = plan.steps[0]
        return VERBS[step.verb].run(step.config)
    return run_plan(plan)
