"""Quality gates: `--fail-if FIELD OP VALUE` conditions over a flat dict of numbers.

A gate *fails* when its condition holds (`--fail-if "ppl_ratio>1.5"` fails when the ratio
exceeds 1.5). A value that is NaN fails every gate on it: a NaN metric is never a pass.
Generic on purpose: any verb can gate on any numeric field of its summary.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from subspace_cli.errors import GateFailed, UsageError

OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
# Two-character operators first so that ">=" is not read as ">" followed by "=1".
# Field names may hold ':' and '-' (task keys such as lm-eval:my-task.acc).
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.:-]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    text: str
    field: str
    op: str
    threshold: float


@dataclass(frozen=True)
class GateResult:
    condition: str
    field: str
    op: str
    threshold: float
    value: float
    failed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def numeric_fields(values: Mapping[str, Any]) -> list[str]:
    """Keys whose values can be gated on (numbers, not bools or None)."""
    return sorted(k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def parse_condition(text: str, fields: Iterable[str] | None = None) -> Condition:
    """Parse `FIELD OP VALUE`; with `fields`, the field must be one of them (else exit 2)."""
    match = _CONDITION.match(text or "")
    if not match:
        raise UsageError(
            f"--fail-if '{text}' is not FIELD OP VALUE; e.g. 'ppl_ratio>1.5', valid operators: {' '.join(OPS)}"
        )
    field, op, raw = match.groups()
    try:
        threshold = float(raw)
    except ValueError:
        raise UsageError(f"--fail-if '{text}': threshold '{raw}' is not a number") from None
    if math.isnan(threshold):
        raise UsageError(f"--fail-if '{text}': threshold must not be NaN")
    if fields is not None:
        valid = sorted(set(fields))
        if field not in valid:
            raise UsageError(f"--fail-if '{text}': unknown field '{field}'; valid fields: {', '.join(valid)}")
    return Condition(text=text.strip(), field=field, op=op, threshold=threshold)


def parse_conditions(texts: Iterable[str | Condition] | None, fields: Iterable[str] | None = None) -> list[Condition]:
    fields = None if fields is None else list(fields)
    return [c if isinstance(c, Condition) else parse_condition(c, fields) for c in texts or []]


def check_gates(conditions: Iterable[str | Condition] | None, values: Mapping[str, Any]) -> list[GateResult]:
    """Evaluate every condition against `values`; unknown fields raise UsageError (exit 2)."""
    fields = numeric_fields(values)
    results = []
    for cond in parse_conditions(conditions):
        if cond.field not in fields:
            raise UsageError(
                f"--fail-if '{cond.text}': unknown field '{cond.field}'; valid fields: {', '.join(fields)}"
            )
        value = float(values[cond.field])
        failed = math.isnan(value) or bool(OPS[cond.op](value, cond.threshold))
        results.append(GateResult(cond.text, cond.field, cond.op, cond.threshold, value, failed))
    return results


def raise_if_failed(results: Iterable[GateResult], summary: dict | None = None) -> None:
    """GateFailed (exit 1) naming every failed condition; `summary` is printed with --json."""
    failed = [r for r in results if r.failed]
    if not failed:
        return
    listed = "; ".join(f"{r.condition} ({r.field}={r.value:.6g})" for r in failed)
    exc = GateFailed(f"quality gate failed: {listed}", failed=[r.to_dict() for r in failed])
    exc.summary = summary
    raise exc
