"""Which config fields hold paths, declared once on the fields: what a run reads (which its outputs
must stay away from), and the absolute form of a config for the files subspace writes.

A field marks what it holds in its annotation: `model: Annotated[str, MODEL] = Field(...)`. The
marker is metadata only: validation, CLI flags and the JSON Schema are unchanged.

Paths a person writes (a recipe, `--set`, a flag) mean what they mean in the shell: relative to
the current directory. What subspace writes into an output for later use (recipe.yaml,
pipeline.yaml, adapter_config.json) is read from wherever the user is then, so there every local
path is absolute. References that are not local paths stay as written: `builtin:NAME`, the `self`
calibration source, and a model reference that names no local path and reads as a hub id, exactly
as `io.models.resolve_model_path` and `io.data.load_source` would read them.

Importing this module must not import torch (`subspace run --dry-run` loads nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class PathKind:
    """Annotated metadata: what a config field (or each item of a list field) refers to."""

    kind: str


MODEL = PathKind("model")  # a local model directory, a cached hub id or builtin:NAME
DATA = PathKind("data")  # text sources: a file, a directory, builtin:NAME or self; comma-separated lists too
TASK_DATA = PathKind("task-data")  # TASK=SOURCE pairs (merge --eval): SOURCE is DATA, TASK is a label
LOCAL = PathKind("local")  # always a local path the run reads: resume
OUTPUT = PathKind("output")  # a local path the run writes: out, checkpoint_dir, plot


def path_fields(config_class: type[BaseModel]) -> dict[str, PathKind]:
    """field name -> its PathKind, for the fields that declare one."""
    return {name: meta for name, info in config_class.model_fields.items()
            for meta in info.metadata if isinstance(meta, PathKind)}


def input_refs(config: BaseModel) -> list[tuple[str, str]]:
    """(flag, reference) for everything a run of `config` reads: models and data sources (each item of a
    list, the SOURCE of a TASK=SOURCE pair) and local inputs such as --resume. Outputs are left out."""
    refs = []
    for name, kind in path_fields(type(config)).items():
        if kind == OUTPUT:
            continue
        value = getattr(config, name)
        flag = "model" if name in ("model", "models") else "--" + name.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item:
                refs.append((flag, item.partition("=")[2] or item if kind == TASK_DATA else item))
    return refs


def stored_recipe(verb: str, config: BaseModel) -> dict[str, Any]:
    """The recipe.yaml an output holds: the verb and its full config, local paths absolute so it re-runs
    from any directory."""
    return {"verb": verb, "config": absolute_config(type(config), config.model_dump(mode="json"))}


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _inside(path: str, roots: list[Path]) -> bool:
    resolved = Path(absolute(path))
    return any(resolved == root or root in resolved.parents for root in roots)


def absolute_model(ref: str, local_roots: list[Path]) -> str:
    """A model reference, absolute when it is a local path. `local_roots` are directories that
    will exist (a pipeline's outputs): a reference inside one is local even before it exists."""
    from subspace_cli.io.models import _HUB_ID  # the hub-id rule resolve_model_path applies

    if not ref or ref.startswith("builtin:"):
        return ref
    hub_id = not ref.startswith((".", "/", "~")) and ref.count("/") <= 1 and _HUB_ID.match(ref)
    if Path(ref).expanduser().exists() or _inside(ref, local_roots) or not hub_id:
        return absolute(ref)
    return ref


def absolute_data(spec: str) -> str:
    """A data spec (or comma list of specs) with every local path absolute."""
    from subspace_cli.io.data import SELF_SPEC

    if not spec:
        return spec
    if Path(spec).expanduser().exists():  # split_specs never splits an existing path at its commas
        return absolute(spec)
    parts = [part.strip() for part in spec.split(",")]
    return ",".join(part if not part or part == SELF_SPEC or part.startswith("builtin:") else absolute(part)
                    for part in parts)


def _absolute_one(value: Any, kind: PathKind, local_roots: list[Path]) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if kind == MODEL:
        return absolute_model(value, local_roots)
    if kind == DATA:
        return absolute_data(value)
    if kind == TASK_DATA:
        task, sep, source = value.partition("=")
        return f"{task}={absolute_data(source)}" if sep and task else value
    return absolute(value)


def absolute_config(config_class: type[BaseModel], values: dict[str, Any],
                    local_roots: Iterable[str | Path] = ()) -> dict[str, Any]:
    """values (a config dump) with every local path in a path field made absolute."""
    roots = [Path(absolute(str(root))) for root in local_roots]
    out = dict(values)
    for name, kind in path_fields(config_class).items():
        if name not in out:
            continue
        value = out[name]
        if isinstance(value, list):
            out[name] = [_absolute_one(item, kind, roots) for item in value]
        else:
            out[name] = _absolute_one(value, kind, roots)
    return out
