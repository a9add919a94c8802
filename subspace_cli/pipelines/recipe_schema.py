"""JSON Schema of recipe files (both forms), built from the same pydantic models that validate them.

Each step's `config` schema is its verb's config class's `model_json_schema()`. In a pipeline a
config value may be a `${...}` reference that only becomes, say, an integer once resolved, so
pipeline configs get a copy of each verb's schema in which every property (and list item) also
accepts a string holding a reference. Single-step recipes are not substituted and keep the
strict schema, except that a list field also takes one item: the verbs' validators read
`data: builtin:kjv` as `[builtin:kjv]` (and split commas), and an editor should not flag it.
A verb with methods gets `method` as an enum of its registered methods and `options` as one of
their option schemas (this imports the method modules, hence torch).
"""

from __future__ import annotations

import copy
from typing import Any

from subspace_cli.methods.catalog import methods_for
from subspace_cli.methods.registry import VERBS_WITH_METHODS
from subspace_cli.pipelines.recipe_format import PipelineRecipe, SingleStepRecipe, Step
from subspace_cli.pipelines.verbs import config_classes

DRAFT = "https://json-schema.org/draft/2020-12/schema"
REFERENCE = {
    "type": "string",
    "pattern": r"\$\{[^{}]+\}",
    "description": "a ${var} or ${STEP.FIELD} reference, resolved before the step's config is validated",
}
_HOISTED = ("title", "description", "default")  # kept on the property, where editors show them


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def _or_reference(node: dict[str, Any]) -> dict[str, Any]:
    """node, or a reference string; list items may be references too."""
    node = copy.deepcopy(node)
    outer = {key: node.pop(key) for key in _HOISTED if key in node}
    options = node["anyOf"] if set(node) == {"anyOf"} else [node]
    for option in options:
        if option.get("type") == "array" and isinstance(option.get("items"), dict):
            option["items"] = {"anyOf": [option["items"], _ref("Reference")]}
    return {**outer, "anyOf": [*options, _ref("Reference")]}


def _one_or_list(node: dict[str, Any]) -> dict[str, Any]:
    """An array property (or an optional one) that also accepts a single item."""
    options = node.get("anyOf", [node])
    arrays = [o for o in options if o.get("type") == "array" and isinstance(o.get("items"), dict)]
    if not arrays:
        return node
    node = copy.deepcopy(node)
    outer = {key: node.pop(key) for key in _HOISTED if key in node}
    options = node.get("anyOf", [node])
    return {**outer, "anyOf": [*options, *(copy.deepcopy(a["items"]) for a in arrays)]}


def _lenient(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"] = {name: _one_or_list(prop) for name, prop in schema["properties"].items()}
    return schema


def _with_references(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"] = {name: _or_reference(prop) for name, prop in schema["properties"].items()}
    schema["title"] = schema.get("title", "") + " (in a pipeline step)"
    return schema


def _for_verb(model, verb: str, config_def: str) -> dict[str, Any]:
    """model's schema (SingleStepRecipe or Step) with `verb` fixed and `config` pointing at config_def."""
    schema = model.model_json_schema()
    schema.pop("$defs", None)
    schema["title"] = f"{model.__name__} ({verb})"
    schema["properties"]["verb"] = {"const": verb, "description": schema["properties"]["verb"].get("description")}
    schema["properties"]["config"] = {**_ref(config_def), "description": schema["properties"]["config"].get("description")}
    return schema


def _with_methods(schema: dict[str, Any], verb: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`method` limited to the verb's registered methods; `options` to one of their option sets."""
    methods = methods_for(verb)
    schema["properties"]["method"]["enum"] = list(methods)
    choices = []
    for name, method in methods.items():
        options = method.config_class.model_json_schema(ref_template="#/$defs/{model}", by_alias=True)
        defs.update(options.pop("$defs", {}))
        options["title"] = f"{verb} --method {name} options"
        options["description"] = method.summary
        key = f"MethodOptions-{verb}-{name}"
        defs[key] = options
        choices.append(_ref(key))
    described = {k: schema["properties"]["options"][k] for k in _HOISTED if k in schema["properties"]["options"]}
    schema["properties"]["options"] = {**described, "anyOf": choices}
    return schema


def recipe_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {"Reference": REFERENCE}
    single, steps = [], []
    for verb, config_class in config_classes().items():
        schema = config_class.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        if verb in VERBS_WITH_METHODS:
            schema = _with_methods(schema, verb, defs)
        schema = _lenient(schema)
        name = config_class.__name__
        defs[name] = schema
        defs[f"{name}InPipeline"] = _with_references(schema)
        single.append(_for_verb(SingleStepRecipe, verb, name))
        steps.append(_for_verb(Step, verb, f"{name}InPipeline"))
    pipeline = PipelineRecipe.model_json_schema()
    pipeline.pop("$defs", None)
    pipeline["properties"]["steps"]["items"] = {"oneOf": steps}
    defs["SingleStepRecipe"] = {"title": "SingleStepRecipe", "description": SingleStepRecipe.__doc__, "oneOf": single}
    defs["PipelineRecipe"] = pipeline
    return {
        "$schema": DRAFT,
        "title": "subspace recipe",
        "description": "A `subspace run` recipe: {verb, config} for one step, or {vars, steps} for a pipeline.",
        "oneOf": [_ref("SingleStepRecipe"), _ref("PipelineRecipe")],
        "$defs": defs,
    }
