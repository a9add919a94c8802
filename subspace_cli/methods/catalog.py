"""Lookups over the registered methods, with the built-in method modules loaded first.

Adding a method of an existing kind means adding its module and one import line below
(docs/contributing.md); every verb, `subspace methods`, `subspace schema` and the tests' case
tables read the registry through these functions.
"""

from __future__ import annotations

import functools

from subspace_cli.errors import UsageError
from subspace_cli.methods.registry import Method, MethodConfig, registered, registered_for_config


@functools.cache
def _load_builtin_methods() -> None:
    # Importing the modules runs their register() lines.
    from subspace_cli.methods.adapt import dora, flora, lora_family, singular  # noqa: F401
    from subspace_cli.methods.compress import asvd, cospadi, svd, svd_llm  # noqa: F401
    from subspace_cli.methods.merge import concrete, task_arithmetic  # noqa: F401
    from subspace_cli.methods.merge import singular as _merge_singular  # noqa: F401
    from subspace_cli.methods.unlearn import loss_based, steering  # noqa: F401


def methods_for(verb: str) -> dict[str, Method]:
    _load_builtin_methods()
    return {name: m for (v, name), m in sorted(registered().items()) if v == verb}


def get_method(verb: str, name: str) -> Method:
    available = methods_for(verb)
    if name not in available:
        raise UsageError(f"--method '{name}' is not a {verb} method; valid: {', '.join(available)}")
    return available[name]


def method_for_config(config: MethodConfig) -> Method:
    """The method a resolved config belongs to (configs are keyed by class, one class per method)."""
    _load_builtin_methods()
    method = registered_for_config(config)
    if method is None:
        raise KeyError(f"{type(config).__name__} is not a registered method's config")
    return method
