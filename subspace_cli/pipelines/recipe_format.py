"""The two recipe forms, declared once (validation here, JSON Schema in recipe_schema.py).

Single step, as every output's recipe.yaml:   {verb: NAME, config: {...}}
Pipeline, steps run in order:                 {vars: {...}, steps: [{name, verb, config}, ...]}

Importing this module must not import torch (recipe validation stays fast): it needs only the
verbs' config classes (pipelines/verbs.py), which live in torch-free modules. `subspace schema`
also lists each verb's registered methods, which imports them (recipe_schema.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from subspace_cli.errors import UsageError, did_you_mean
from subspace_cli.pipelines.verbs import VERBS

VERB_NAMES = tuple(VERBS)
Verb = Literal[VERB_NAMES]  # type: ignore[valid-type]  # the verbs of pipelines/verbs.py
# Names appear inside `${NAME}` and `${STEP.FIELD}`, so no dots or braces.
NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class SingleStepRecipe(BaseModel):
    """What every output's recipe.yaml holds: one verb and its fully resolved config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    verb: Verb = Field(description="the subspace verb to run")
    config: dict[str, Any] = Field(description="the verb's options (field names as in `subspace VERB --help`, with _)")


class Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(None, pattern=NAME, description="step name, used in ${NAME.out} references (default: the verb)")
    verb: Verb = Field(description="the subspace verb to run")
    config: dict[str, Any] = Field(description="the verb's options; strings may hold ${var} and ${STEP.FIELD} references")


class PipelineRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vars: dict[str, Any] = Field(default_factory=dict, description="values substituted for ${NAME}; `--set NAME=VALUE` overrides")
    steps: list[Step] = Field(min_length=1, description="the steps, run in order; a gate failure stops the pipeline (exit 1)")


def unknown(kind: str, word: str, choices: Iterable[str], where: str) -> UsageError:
    """`WHERE: unknown KIND 'word' (did you mean 'x'?); valid: a, b` (exit 2)."""
    choices = list(choices)
    return UsageError(f"{where}: unknown {kind} '{word}'{did_you_mean(word, choices)}; valid: {', '.join(choices) or 'none'}")


def check_keys(values: dict, model: type[BaseModel], where: str, kind: str = "field") -> None:
    for key in values:
        if key not in model.model_fields:
            raise unknown(kind, key, model.model_fields, where)


def build(model: type[BaseModel], values: dict, where: str, kind: str = "field"):
    """`model(**values)`, unknown keys named with a suggestion, other errors on one line (exit 2)."""
    check_keys(values, model, where, kind)
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _place(err["loc"])
        if err["type"] == "missing":
            raise UsageError(f"{where}: missing required {kind} '{loc}'") from exc
        if err["type"] == "literal_error" and err["loc"] and err["loc"][-1] == "verb":
            raise unknown("verb", err["input"], VERB_NAMES, where) from exc
        if not loc:  # a check across fields (a model validator): its message says what to fix
            raise UsageError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from exc
        # Recipe fields by their recipe names (the command line names its flags: cli/options.py).
        raise UsageError(f"{where}: {kind} '{loc}': {err['msg']}, got {err.get('input')!r}") from exc


def _place(loc: tuple) -> str:
    """pydantic's error location as written in YAML: `models[1]`, `options.alpha`; dict keys as keys."""
    text = ""
    for part in loc:
        if part == "[key]":
            text += " (key)"
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
