"""YAML files a person writes (recipes, merge configs): read strictly, every problem one exit-2 line.

Strict where YAML is silent: a key given twice in one mapping would keep only the last value, and a
recursive alias (`a: &x [*x]`) would recurse forever once resolved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from subspace_cli.errors import UsageError


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing duplicate keys and recursive aliases."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = []
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` is flattened by construct_mapping
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            problem = f"the key {key!r} appears twice in one mapping; keep one"
            raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node, deep=True)


# Eager (non-generator) constructors: PyYAML then refuses a recursive node instead of building one.
StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG,
                             lambda loader, node: loader.construct_sequence(node, deep=True))


def yaml_problem(exc: yaml.YAMLError) -> str:
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc).splitlines()[0]


def load_strict(text: str) -> Any:
    """A YAML value (a `--set` value, say); yaml.YAMLError as PyYAML raises it."""
    return yaml.load(text, Loader=StrictLoader)


def parse_key_value(pair: str, flag: str, what: str) -> tuple[str, Any]:
    """`FLAG KEY=VALUE` (`-O rank=8`, `--set out=DIR`) into (KEY, VALUE read as strict YAML: numbers,
    bools, flow lists). Exit 2 naming the flag for a pair without `=` or a value that is not YAML;
    `what` says what to write instead."""
    key, sep, raw = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"{flag} '{pair}' is not KEY=VALUE; write {what}")
    try:
        return key, load_strict(raw)
    except yaml.YAMLError as exc:
        raise UsageError(f"{flag} '{pair}': value is not valid YAML: {yaml_problem(exc)}; write a YAML "
                         f"scalar or flow list, e.g. {flag} {key}=[1,2]") from exc


def read_yaml_mapping(path: Path, what: str, forms: str) -> dict:
    """The mapping a YAML file holds; exit 2 naming `what` ("recipe", "merge config") for a missing,
    unreadable, non-UTF-8, binary, empty, malformed or non-mapping file. `forms` says what to write."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} '{path}' is a directory; pass a YAML file: {forms}")
    if not path.is_file():
        raise UsageError(f"{what} '{path}' does not exist; pass a YAML file: {forms}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UsageError(f"{what} '{path}' cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); it must be a YAML file: {forms}") from None
    if "\x00" in text:  # valid UTF-8 can still be a binary file
        raise UsageError(f"{what} '{path}' is a binary file, not YAML text; it must be a YAML file: {forms}")
    try:
        data = load_strict(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} '{path}' is not valid YAML: {yaml_problem(exc)}") from exc
    if data is None:
        raise UsageError(f"{what} '{path}' is empty; write {forms}")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single value ({type(data).__name__})"
        raise UsageError(f"{what} '{path}' holds {kind}, not a mapping; write {forms}")
    return data
