"""`${NAME}` and `${STEP.FIELD}` references inside pipeline step configs.

`${NAME}` is a var (from `vars:` or `--set NAME=VALUE`); `${STEP.FIELD}` is a field of an
earlier step's resolved config, usually `${STEP.out}`, its output directory. A string that is
exactly one reference takes the referenced value with its type (a number stays a number, a list
a list); a reference inside longer text is replaced by its text. A var may use other vars
(`out: "${work}/out"`); vars are resolved first, each once, and a var that leads back to itself is
exit 2 naming the cycle. Step configs are then substituted in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from subspace_cli.errors import UsageError, did_you_mean

REFERENCE = re.compile(r"\$\{([^{}]*)\}")
TARGET = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?$")


@dataclass
class Scope:
    """What a step can refer to: the vars, and the resolved configs of the steps before it."""

    vars: dict[str, Any]
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)  # step name -> config.model_dump(mode="json")
    verbs: dict[str, str] = field(default_factory=dict)  # step name -> verb, for messages
    later: list[str] = field(default_factory=list)
    current: str = ""


def targets(value: Any) -> Iterator[tuple[str, str | None]]:
    """Every (target, field) referenced anywhere inside value (field is None for a var)."""
    if isinstance(value, str):
        for match in REFERENCE.finditer(value):
            parsed = TARGET.match(match.group(1).strip())
            if parsed:
                yield parsed.group(1), parsed.group(2)
    elif isinstance(value, dict):
        for item in value.values():
            yield from targets(item)
    elif isinstance(value, list):
        for item in value:
            yield from targets(item)


def resolve_vars(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Every var with the vars it uses substituted (dependencies first). A var can refer only to
    other vars: the steps have not been resolved yet."""
    done: dict[str, Any] = {}

    def resolve(name: str, chain: list[str]) -> None:
        if name in done or name not in values:  # an unknown name is reported by substitute below
            return
        if name in chain:
            cycle = " -> ".join([*chain[chain.index(name):], name])
            itself = "refers to itself" if chain[-1] == name else "refers back to itself"
            raise UsageError(f"{where}: var '{name}' {itself} ({cycle}); give it a value, or a reference to "
                             f"a var outside the cycle")
        for target, attr in targets(values[name]):
            if attr is not None:
                raise UsageError(f"{where}: vars.{name}: '${{{target}.{attr}}}' refers to a step; a var can use only "
                                 f"other vars; write the step reference in a step's config")
            resolve(target, [*chain, name])
        done[name] = substitute(values[name], Scope(vars={**values, **done}), f"{where}: vars.{name}")

    for name in values:
        resolve(name, [])
    return {name: done[name] for name in values}


def substitute(value: Any, scope: Scope, where: str) -> Any:
    """value with every reference replaced; `where` names the place in messages (e.g. step 'a', config.out)."""
    if isinstance(value, dict):
        return {k: substitute(v, scope, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, scope, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if "${" in REFERENCE.sub("", value):
        raise UsageError(f"{where}: '{value}' has an unterminated '${{'; write references as ${{NAME}} or ${{STEP.out}}")
    whole = REFERENCE.fullmatch(value.strip())
    if whole:
        return _lookup(whole.group(1), scope, where)

    def text(match: re.Match) -> str:
        found = _lookup(match.group(1), scope, where)
        if isinstance(found, bool) or not isinstance(found, (str, int, float)):
            raise UsageError(f"{where}: '{match.group(0)}' is {found!r}, which cannot be part of a longer string; "
                             f"use it as the whole value")
        return str(found)

    return REFERENCE.sub(text, value)


def _lookup(inner: str, scope: Scope, where: str) -> Any:
    parsed = TARGET.match(inner.strip())
    if not parsed:
        raise UsageError(f"{where}: '${{{inner}}}' is not a reference; write ${{NAME}} for a var or ${{STEP.out}} "
                         "for an earlier step's output directory")
    target, attr = parsed.groups()
    if attr is None:
        return _var(target, scope, where)
    if target in scope.earlier:
        config = scope.earlier[target]
        if attr not in config:
            raise UsageError(f"{where}: step '{target}' ({scope.verbs[target]}) has no field '{attr}'"
                             f"{did_you_mean(attr, config)}; its fields: {', '.join(config)}")
        return config[attr]
    earlier = ", ".join(scope.earlier) or "none"
    if target == scope.current:
        raise UsageError(f"{where}: '${{{inner}}}' refers to its own step '{target}'; "
                         f"a step can refer only to the steps before it: {earlier}")
    if target in scope.later:
        raise UsageError(f"{where}: '${{{inner}}}' refers to step '{target}', which runs later; "
                         f"a step can refer only to the steps before it: {earlier}")
    hint = did_you_mean(target, [*scope.earlier, *scope.later])
    raise UsageError(f"{where}: '${{{inner}}}' refers to unknown step '{target}'{hint}; steps before this one: {earlier}")


def _var(name: str, scope: Scope, where: str) -> Any:
    if name in scope.vars:
        return scope.vars[name]
    defined = ", ".join(scope.vars) or "none"
    hint = did_you_mean(name, scope.vars)
    if not hint and (name in scope.earlier or name in scope.later or name == scope.current):
        hint = f" (for step '{name}''s output directory write ${{{name}.out}})"
    raise UsageError(f"{where}: unknown var '{name}'{hint}; defined vars: {defined} "
                     f"(add it under vars: or pass --set {name}=VALUE)")
