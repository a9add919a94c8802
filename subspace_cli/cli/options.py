"""Typer options whose default and help come from a pydantic config field (declared once), and the
flags every verb shares, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# The common flags: `json_out: JsonFlag = False`, `quiet: QuietFlag = False`, `option: MethodOptionFlags = None`.
# (Optional[list[str]]: typer reads these annotations at run time.)
JsonFlag = Annotated[bool, typer.Option("--json", help="print one JSON summary on stdout (also when a command fails)")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or info logs")]
MethodOptionFlags = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "--option", "-O", help="method options as KEY=VALUE, repeatable (see `subspace methods NAME`)")]


def field_option(model: type[BaseModel], name: str, *flags: str, default: Any = PydanticUndefined, **kwargs) -> Any:
    info = model.model_fields[name]
    if default is PydanticUndefined:
        default = info.default if info.default is not PydanticUndefined else None
        if info.default_factory is not None:
            default = info.default_factory()
    if not flags:
        flags = ("--" + name.replace("_", "-"),)
    return typer.Option(default, *flags, help=info.description, **kwargs)


def field_argument(model: type[BaseModel], name: str, **kwargs) -> Any:
    return typer.Argument(..., help=model.model_fields[name].description, **kwargs)


def config_from_cli(model: type[BaseModel], values: dict[str, Any]):
    """Build a config, turning validation errors into exit-2 messages naming the flag."""
    from pydantic import ValidationError

    from subspace_cli.errors import UsageError

    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "options"
        flag = "--" + field.replace("_", "-")
        value = values.get(field, err.get("input"))
        raise UsageError(f"{flag} {value!r}: {err['msg']}") from exc
