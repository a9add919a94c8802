"""Registry of methods keyed by name. Registration fails loudly on duplicate or malformed names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from subspace_cli.errors import UsageError

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class MethodConfig(BaseModel):
    """Base of every method's options: frozen, unknown keys rejected."""

    # allow_inf_nan=False: `-O lr=inf` or `-O lambda=nan` is a typo, refused before any work.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class Method:
    name: str
    verb: str  # "compress", later "adapt", "merge", "unlearn"
    config_class: type[MethodConfig]
    build: Callable[..., Any]  # the method's entry point; its signature is the verb's contract
    paper: str
    summary: str
    needs: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("calibration",)
    # Sparse-dictionary methods: fit(spectral, size, config, generator) -> DictionaryFactors.
    # `build` then gives the whitening transform only. None: a low-rank method.
    fit: Callable[..., Any] | None = None
    # Adapt methods: learning rate used when --lr is not given (singular-value methods need larger steps).
    default_lr: float | None = None

    def make_config(self, options: dict[str, Any] | None) -> MethodConfig:
        try:
            return self.config_class(**(options or {}))
        except ValidationError as exc:
            valid = ", ".join(f.alias or k for k, f in self.config_class.model_fields.items()) or "none"
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "options"
            raise UsageError(f"method '{self.name}' option '{where}': {first['msg']} (valid options: {valid})") from exc


_REGISTRY: dict[tuple[str, str], Method] = {}


def register(method: Method) -> Method:
    if not _NAME.match(method.name):
        raise ValueError(f"method name '{method.name}' must be lowercase words joined by '-'")
    key = (method.verb, method.name)
    if key in _REGISTRY:
        raise ValueError(f"method '{method.name}' is already registered for '{method.verb}'")
    _REGISTRY[key] = method
    return method


def _load_builtin_methods() -> None:
    # Importing the modules runs their register() lines.
    from subspace_cli.methods import asvd, cospadi, svd, svd_llm  # noqa: F401
    from subspace_cli.methods.adapt import dora, flora, lora_family, singular  # noqa: F401
    from subspace_cli.methods.merge import concrete, task_arithmetic  # noqa: F401
    from subspace_cli.methods.merge import singular as _merge_singular  # noqa: F401
    from subspace_cli.methods.unlearn import loss_based, steering  # noqa: F401


def methods_for(verb: str) -> dict[str, Method]:
    _load_builtin_methods()
    return {name: m for (v, name), m in sorted(_REGISTRY.items()) if v == verb}


def get_method(verb: str, name: str) -> Method:
    available = methods_for(verb)
    if name not in available:
        raise UsageError(f"--method '{name}' is not a {verb} method; valid: {', '.join(available)}")
    return available[name]
