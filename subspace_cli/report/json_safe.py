"""Strict JSON for `--json` and report.json: no bare NaN / Infinity, which strict parsers reject.

A non-finite float becomes `null`, and the object that held it gains a `non_finite` entry saying
what the value was (`{"ppl": null, "non_finite": {"ppl": "inf"}}`), so a script can tell a
missing metric from one that overflowed.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _label(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def finite_json(value: Any) -> Any:
    """A copy of `value` (dicts, lists, tuples, scalars) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out: dict = {}
        why: dict[str, str] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                why[str(key)] = _label(item)
            out[key] = finite_json(item)
        if why:
            earlier = value.get("non_finite")
            out["non_finite"] = {**earlier, **why} if isinstance(earlier, dict) else why
        return out
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of `finite_json(value)`; `allow_nan=False` guarantees the result is strict JSON."""
    return json.dumps(finite_json(value), allow_nan=False, default=_default, **kwargs)


def _default(value: Any) -> Any:
    """Numbers that are not Python floats (numpy, torch scalars) are made floats, so they are checked too."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            scalar = item()
        except (TypeError, ValueError, RuntimeError):
            return str(value)
        if isinstance(scalar, float) and not math.isfinite(scalar):
            return None
        return scalar
    return str(value)
