"""The method contract shared by every verb, and the registry.

Each verb types its methods with a subclass of `Method` in its own base module, naming the entry
point the verb's pipeline calls:

    compress  methods/compress/base.py  LowRankMethod.transform, DictionaryMethod.fit
    adapt     methods/adapt/base.py     AdapterMethod.attach
    merge     methods/merge/base.py     TensorMerge.merge, ModelMerge.prepare
    unlearn   methods/unlearn/base.py   UnlearnMethod.plan

A method is registered once (`register`), keyed by (verb, name) and by its config class, so a
resolved config names its method without a string. Lookups (`methods_for`, `get_method`,
`method_for_config`) live in methods/catalog.py, which imports the built-in method modules.
docs/contributing.md has the checklist for adding one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from subspace_cli.errors import UsageError

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
VERBS_WITH_METHODS = ("compress", "adapt", "merge", "unlearn")


class MethodConfig(BaseModel):
    """Base of every method's options: frozen, unknown keys rejected."""

    # allow_inf_nan=False: `-O lr=inf` or `-O lambda=nan` is a typo, refused before any work.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Needs(str, Enum):
    """What a method needs beyond the model; each verb checks these before loading anything."""

    CALIBRATION = "calibration"  # compress: --calib text for Gram statistics
    BASE = "base"  # merge: the base model the inputs were fine-tuned from (--base)
    TASK_DATA = "unlabeled task data"  # merge: one --data per input model
    TRAINING_DATA = "training data"  # adapt: --data
    FORGET_DATA = "forget data"  # unlearn: --forget
    RETAIN_DATA = "retain data"  # unlearn: --retain


@dataclass(frozen=True, kw_only=True)
class Method:
    """What every method declares. A verb's subclass adds the entry points its pipeline calls."""

    verb: ClassVar[str] = ""
    name: str
    config_class: type[MethodConfig]
    paper: str
    summary: str
    needs: frozenset[Needs] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(Needs(n) for n in self.needs))

    def make_config(self, options: dict[str, Any] | None) -> MethodConfig:
        try:
            return self.config_class(**(options or {}))
        except ValidationError as exc:
            valid = ", ".join(f.alias or k for k, f in self.config_class.model_fields.items()) or "none"
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "options"
            raise UsageError(f"method '{self.name}' option '{where}': {first['msg']} (valid options: {valid})") from exc

    def describe(self) -> dict[str, Any]:
        """Extra facts for `subspace methods` (e.g. a default learning rate); none by default."""
        return {}


_BY_NAME: dict[tuple[str, str], Method] = {}
_BY_CONFIG: dict[type[MethodConfig], Method] = {}


def register(method: Method) -> Method:
    if type(method).verb not in VERBS_WITH_METHODS:
        raise TypeError(f"method '{method.name}' must be a verb's Method subclass (LowRankMethod, AdapterMethod, "
                        f"TensorMerge, UnlearnMethod, ...), got {type(method).__name__}")
    if not _NAME.match(method.name):
        raise ValueError(f"method name '{method.name}' must be lowercase words joined by '-'")
    key = (method.verb, method.name)
    if key in _BY_NAME:
        raise ValueError(f"method '{method.name}' is already registered for '{method.verb}'")
    if method.config_class in _BY_CONFIG:
        raise ValueError(f"config class {method.config_class.__name__} already belongs to method "
                         f"'{_BY_CONFIG[method.config_class].name}'; give '{method.name}' a subclass of its own")
    _BY_NAME[key] = method
    _BY_CONFIG[method.config_class] = method
    return method


def unregister(method: Method) -> None:
    """Remove a registered method (tests that register throwaway methods clean up with this)."""
    _BY_NAME.pop((method.verb, method.name), None)
    _BY_CONFIG.pop(method.config_class, None)


def registered() -> dict[tuple[str, str], Method]:
    """Everything registered so far, by (verb, name); methods/catalog.py loads the built-ins first."""
    return dict(_BY_NAME)


def registered_for_config(config: MethodConfig) -> Method | None:
    return _BY_CONFIG.get(type(config))
