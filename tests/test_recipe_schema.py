"""`subspace schema`: a JSON Schema built from the verbs' config classes, which validates every
shipped recipe, rejects typos, and is made without importing torch."""

import json
import re
from pathlib import Path

import pytest
import yaml

from cli_runner import run_cli as cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PIPELINE = RECIPES / "pipeline-smollm2-merge-compress-gate.yaml"


ANNOTATIONS = {"title", "description", "default", "$schema"}
KEYWORDS = {"$ref", "$defs", "oneOf", "anyOf", "type", "properties", "required", "additionalProperties", "items",
            "const", "enum", "pattern", "minItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(instance, kind: str) -> bool:
    if kind in ("integer", "number"):
        ok = isinstance(instance, int) or (kind == "number" and isinstance(instance, float))
        return ok and not isinstance(instance, bool)
    return isinstance(instance, TYPES[kind])


def _errors(instance, schema: dict, root: dict, path: str = "$") -> list[str]:
    """A small JSON Schema checker for exactly the keywords in KEYWORDS (jsonschema is not installed)."""
    errors = []
    if "$ref" in schema:
        errors += _errors(instance, root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root, path)
    if "oneOf" in schema:
        matches = sum(not _errors(instance, option, root, path) for option in schema["oneOf"])
        errors += [] if matches == 1 else [f"{path}: matches {matches} of oneOf"]
    if "anyOf" in schema and all(_errors(instance, option, root, path) for option in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: {instance!r} != {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "type" in schema and not _is(instance, schema["type"]):
        return errors + [f"{path}: {instance!r} is not {schema['type']}"]
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {key}" for key in schema.get("required", []) if key not in instance]
        for key, value in instance.items():
            if key in properties:
                errors += _errors(value, properties[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        for i, item in enumerate(instance):
            errors += _errors(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(instance, str) and "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
    if _is(instance, "number"):
        for key, bad in (("minimum", lambda v, t: v < t), ("maximum", lambda v, t: v > t),
                         ("exclusiveMinimum", lambda v, t: v <= t), ("exclusiveMaximum", lambda v, t: v >= t)):
            if key in schema and bad(instance, schema[key]):
                errors.append(f"{path}: {instance} violates {key} {schema[key]}")
    return errors


def _keywords(node, seen: set) -> set:
    if isinstance(node, dict):
        for key, value in node.items():
            seen.add(key)
            if key in ("properties", "$defs"):
                for sub in value.values():
                    _keywords(sub, seen)
            elif key not in ("const", "enum", "default"):
                _keywords(value, seen)
    elif isinstance(node, list):
        for item in node:
            _keywords(item, seen)
    return seen


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    proc = cli("schema")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_schema_is_json_schema_from_the_config_classes(schema, tmp_path):
    from subspace_cli.pipelines.verbs import config_classes

    assert schema["$schema"].startswith("https://json-schema.org/") and len(schema["oneOf"]) == 2
    assert _keywords(schema, set()) <= KEYWORDS | ANNOTATIONS  # so the checker above checks all of it
    for config_class in config_classes().values():
        assert set(schema["$defs"][config_class.__name__]["properties"]) == set(config_class.model_fields)
    out = tmp_path / "recipe.schema.json"
    assert cli("schema", "--out", out).returncode == 0 and json.loads(out.read_text()) == schema


def test_schema_validates_the_shipped_recipes_and_rejects_typos(schema):
    for path in sorted(RECIPES.glob("*.yaml")):
        assert _errors(yaml.safe_load(path.read_text()), schema, schema) == [], path.name
    single = yaml.safe_load((RECIPES / "compress-smollm2-svd-llm.yaml").read_text())
    pipeline = yaml.safe_load(PIPELINE.read_text())
    typos = [
        {**single, "config": {**single["config"], "ration": 0.2}},
        {**single, "verb": "compres"},
        {**single, "config": {**single["config"], "ratio": "${ratio}"}},  # single-step recipes are not substituted
        {**pipeline, "steps": [{**pipeline["steps"][0], "config": {**pipeline["steps"][0]["config"], "stepz": 3}}]},
        {**pipeline, "steps": []},
        {**pipeline, "stages": []},
    ]
    for bad in typos:
        assert _errors(bad, schema, schema), bad


def test_schema_lists_every_registered_method_and_its_options():
    """`method` is one of the verb's registered methods and `options` one of their option sets: an
    editor completes both, and a typo in either is flagged before anything runs."""
    from subspace_cli.methods.catalog import methods_for
    from subspace_cli.pipelines.recipe_schema import recipe_schema
    from subspace_cli.pipelines.verbs import config_classes

    schema = recipe_schema()
    for verb in ("compress", "adapt", "merge", "unlearn"):
        config = schema["$defs"][config_classes()[verb].__name__]
        assert config["properties"]["method"]["enum"] == list(methods_for(verb))
        for name, method in methods_for(verb).items():
            options = schema["$defs"][f"MethodOptions-{verb}-{name}"]
            fields = {f.alias or k for k, f in method.config_class.model_fields.items()}
            assert set(options.get("properties", {})) == fields and options["additionalProperties"] is False
