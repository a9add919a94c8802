"""Checks one documented command without running it (for tests/test_docs.py, whose docstring
says what is validated and what is not).

`subspace VERB ...` goes through the real typer command in-process: `make_context` parses
it (unknown flags, missing values and bad types fail there), the verb's own callback builds its
config (with the pipeline runner swapped for one that hands the config back), and
`pipeline_run.check_steps` runs the pre-load checks `subspace run --dry-run` runs for a step.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path
from unittest import mock

import typer
import typer.main
import yaml

from doc_commands import Command
from subspace_cli.cli.app import COMMAND_MODULES
from subspace_cli.errors import SubspaceError
from subspace_cli.pipelines.verbs import VERBS

REPO = Path(__file__).resolve().parents[1]

# typer vendors click in recent releases; its exceptions and click's share this base either way.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


# Placeholders the docs write in synopsis lines, and what the check does with each.
KEPT = {"MODEL", "BASE", "MODEL_A", "MODEL_B", "DIR", "D", "F", "R"}  # passed as written: nothing opens them before loading
DROPPED = {"M", "LR", "KEY=VALUE"}  # dropped with their flag (which must exist): the default stands in
FRAGMENT = {"CONFIG.yaml"}  # a file the command would read: only the flags are checked

# verb -> (module under cli/, module under pipelines/, the runner the cli module calls), from the verb table
RUNNERS = {name: (COMMAND_MODULES.get(name, name), verb.pipeline.rsplit(".", 1)[1], verb.runner)
           for name, verb in VERBS.items()}
WRITES_OUT = {"compress", "adapt", "merge", "unlearn", "schema"}
MODEL_FIELDS = {"model", "base", "baseline", "models"}
VARIABLE = re.compile(r"\$\{\{[^}]*\}\}|\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


class DocError(AssertionError):
    def __init__(self, command: Command, problem: str):
        super().__init__(f"{command.where()}\n    {problem}")


@functools.cache
def root_command():
    from subspace_cli.cli.app import app

    return typer.main.get_command(app)


# ----------------------------------------------------------------------------- launchers


def _argparse(parser, args: list[str]):
    """parser.parse_args, with argparse's usage text and exit turned into a message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args), None
    except SystemExit:
        return None, (err.getvalue().strip().splitlines() or ["bad arguments"])[-1]


def subspace_argv(command: Command) -> list[str] | None:
    """The arguments after `subspace`, whichever way the doc starts the tool; None for other programs.
    torchrun and accelerate launch lines are parsed by those tools' own argument parsers."""
    argv = list(command.argv)
    program = argv[0]
    if program == "subspace" or program.endswith("/subspace"):
        return argv[1:]
    if re.fullmatch(r"(.*/)?python3?", program):
        return argv[3:] if argv[1:3] == ["-m", "subspace_cli"] else None
    if program == "torchrun":
        from torch.distributed.run import get_args_parser as parser
    elif program == "accelerate" and argv[1:2] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser as parser

        argv = argv[1:]
    else:
        return None
    args, problem = _argparse(parser(), argv[1:])
    if problem:
        raise DocError(command, f"{program}: {problem}")
    if not (args.module and args.training_script == "subspace_cli"):
        raise DocError(command, f"{program} does not start `-m subspace_cli`")
    return list(args.training_script_args)


# ----------------------------------------------------------------------------- rewriting the arguments


def expand(argv: list[str], workdir: Path) -> list[str]:
    """$NAME and ${NAME} become workdir/NAME (fresh, empty); GitHub's ${{ ... }} becomes 'expr'."""
    def one(match: re.Match) -> str:
        return str(workdir / match.group(1)) if match.group(1) else "expr"

    return [VARIABLE.sub(one, word) for word in argv]


def find_param(command, flag: str):
    for param in command.params:
        if flag in getattr(param, "opts", ()) or flag in getattr(param, "secondary_opts", ()):
            return param
    return None


def placeholders(doc_command: Command, verb: str, words: list[str]) -> tuple[list[str], bool]:
    """Synopsis notation resolved: `[--flag V]` groups unwrapped, `[options]` and placeholders
    dropped (KEPT, DROPPED, FRAGMENT above). True when only the flags can be checked."""
    command = root_command().commands[verb]
    unwrapped, group = [], False
    for word in words:
        if word == "[options]":
            continue
        if word.startswith("[-"):
            word, group = word[1:], True
        if group and word.endswith("]"):
            word, group = word[:-1], False
        if word:
            unwrapped.append(word)
    result, fragment = [], False
    for i, word in enumerate(unwrapped):
        if word == "...":
            fragment = fragment or i == len(unwrapped) - 1  # a trailing ... stands for options left out
        elif word in FRAGMENT:
            fragment = True
            result.append(word)
        elif word in DROPPED:
            flag = result.pop() if result and result[-1].startswith("-") else None
            if flag is None or find_param(command, flag) is None:
                raise DocError(doc_command, f"placeholder {word!r} follows {flag!r}, which is not an option of subspace {verb}")
        elif re.fullmatch(r"[A-Z][A-Z0-9_]*", word) and word not in KEPT:
            raise DocError(doc_command, f"unknown placeholder {word!r}: list it in tests/doc_checks.py (KEPT, DROPPED or FRAGMENT)")
        else:
            result.append(word)
    return result, fragment


def redirect_outputs(verb: str, words: list[str], workdir: Path) -> list[str]:
    """--out/-o into a fresh directory under workdir; recipes/... paths to the repository's files."""
    words = list(words)
    for i, word in enumerate(words):
        if verb in WRITES_OUT and i > 0 and words[i - 1] in ("--out", "-o"):
            # schema's --out is a file in an existing directory; the verbs' is a directory to create
            words[i] = str(workdir / Path(word).name if verb == "schema" else workdir / "out" / word.strip("/"))
        elif re.match(r"^(\./)?recipes/", word):
            words[i] = str(REPO / word)
    return words


def documented_out(argv: list[str]) -> str | None:
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--out", "-o"):
            return value
    return None


# ----------------------------------------------------------------------------- checks


def check_flags(doc_command: Command, verb: str, words: list[str]) -> None:
    """For fragments: every flag exists, takes its value, and the value has the flag's type."""
    from subspace_cli.methods.catalog import get_method

    command = root_command().commands[verb]
    ctx = command.context_class(command, info_name=f"subspace {verb}")
    opts, _, order = command.make_parser(ctx).parse_args(list(words))
    for param in order:
        if param.name in opts:
            # click's Parameter.type_cast_value; typer's vendored click names it process_value
            cast = getattr(param, "type_cast_value", None) or param.process_value
            cast(ctx, opts[param.name])
    if isinstance(opts.get("method"), str):
        get_method(verb, opts["method"])


def check_builtins(config) -> None:
    """builtin:NAME must name a built-in model in model fields and a built-in corpus elsewhere."""
    from subspace_cli.errors import UsageError
    from subspace_cli.io.builtins import BUILTIN_MODELS, builtin_corpus

    for field, value in config.model_dump().items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str):
                continue
            ref = item.partition("=")[2] if field == "eval" and "=" in item else item  # merge --eval TASK=SOURCE
            if not ref.startswith("builtin:"):
                continue
            if field in MODEL_FIELDS and ref.removeprefix("builtin:") not in BUILTIN_MODELS:
                raise UsageError(f"--{field.replace('_', '-')} '{ref}': unknown builtin model; valid: "
                                 + ", ".join(f"builtin:{name}" for name in BUILTIN_MODELS))
            if field not in MODEL_FIELDS:
                builtin_corpus(ref)


def validate_steps(steps) -> None:
    """What `subspace run --dry-run` checks for each step, plus the builtin: names."""
    from subspace_cli.pipelines.pipeline_run import check_steps
    from subspace_cli.pipelines.recipes import Plan

    check_steps(Plan(source="docs", pipeline=True, vars={}, steps=tuple(steps)))
    for step in steps:
        check_builtins(step.config)


@contextlib.contextmanager
def captured_pipeline(verb: str):
    """Run the verb's callback with run_command calling straight through (no printing, errors
    raised as they are) and the pipeline runner handing its config back."""
    import importlib

    from subspace_cli.cli import common as cli_common

    results: list = []
    cli_module = importlib.import_module(f"subspace_cli.cli.{RUNNERS.get(verb, (verb,))[0]}")
    with contextlib.ExitStack() as stack:
        through = lambda fn, **_: results.append(fn())  # noqa: E731
        # run_verb (cli/common.py) calls common's run_command; a few commands call their own import of it
        stack.enter_context(mock.patch.object(cli_common, "run_command", through))
        if hasattr(cli_module, "run_command"):  # schema prints its JSON itself
            stack.enter_context(mock.patch.object(cli_module, "run_command", through))
        if verb in RUNNERS:
            _, pipeline, runner = RUNNERS[verb]
            module = importlib.import_module(f"subspace_cli.pipelines.{pipeline}")
            stack.enter_context(mock.patch.object(module, runner, lambda config: config))
        stdout = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        yield results
        if not results and stdout.getvalue():
            results.append(stdout.getvalue())


def config_of(doc_command: Command, verb: str, words: list[str]):
    """The verb's config, built by its own callback from the parsed command line."""
    command = root_command().commands[verb]
    ctx = command.make_context(f"subspace {verb}", list(words))
    with captured_pipeline(verb) as results:
        command.invoke(ctx)
    return results[0] if results else None


def run_recipe_path(doc_command: Command, recipe: str, workdir: Path, commands: list[Command]) -> Path:
    """A recipe in the repository, or the recipe.yaml that a documented command's --out would hold
    (written here from that command's resolved config, as the verb writes it)."""
    path = Path(recipe)
    if path.is_file():
        return path
    parent = str(path.parent) if path.name == "recipe.yaml" else None
    for producer in commands:
        try:
            argv = subspace_argv(producer)
        except DocError:
            continue  # a broken launcher line fails its own test
        if parent and argv and argv[0] in RUNNERS and documented_out(argv) == parent:
            config = check_subspace(producer, workdir / "producer", commands)
            written = workdir / "produced" / "recipe.yaml"
            written.parent.mkdir(parents=True, exist_ok=True)
            written.write_text(yaml.safe_dump({"verb": argv[0], "config": config.model_dump(mode="json")}, sort_keys=False))
            return written
    raise DocError(doc_command, f"recipe '{recipe}' is not a file in the repository, and no documented command writes it "
                                "(as DIR/recipe.yaml of a command's --out DIR)")


def check_run(doc_command: Command, words: list[str], workdir: Path, commands: list[Command]):
    """`subspace run RECIPE [--set ...]`, always as a dry run: the CLI's own run callback, then
    every step's pre-load checks (single-step recipes included)."""
    from subspace_cli.pipelines.recipes import load_recipe

    command = root_command().commands["run"]
    ctx = command.make_context("subspace run", list(words))
    ctx.params["recipe"] = run_recipe_path(doc_command, str(ctx.params["recipe"]), workdir, commands)
    ctx.params["dry_run"] = True
    with captured_pipeline("run") as results:
        command.invoke(ctx)
    validate_steps(load_recipe(ctx.params["recipe"], list(ctx.params["set_"] or [])).steps)
    return results[0]


def check_subspace(doc_command: Command, workdir: Path, commands: list[Command]):
    """Parse and validate one `subspace ...` command; returns the config (or run's plan, methods'
    catalogue). Raises DocError naming the doc, the line and the command."""
    from subspace_cli.pipelines.recipes import PlannedStep

    workdir.mkdir(parents=True, exist_ok=True)
    words = expand(subspace_argv(doc_command) or [], workdir)
    if not words or words[0] not in root_command().commands:
        raise DocError(doc_command, f"unknown verb {words[0] if words else None!r}; valid: "
                                    + ", ".join(root_command().commands))
    verb = words[0]
    for word in words:
        if re.match(r"^(\./)?recipes/", word) and not (REPO / word).exists():
            raise DocError(doc_command, f"'{word}' does not exist in the repository")
    try:
        rest, fragment = placeholders(doc_command, verb, words[1:])
        rest = redirect_outputs(verb, rest, workdir)
        if fragment:
            return check_flags(doc_command, verb, rest)
        if verb == "run":
            return check_run(doc_command, rest, workdir, commands)
        config = config_of(doc_command, verb, rest)
        if verb in RUNNERS:
            validate_steps([PlannedStep(verb, verb, config)])
        return config
    except CLICK_ERROR as exc:
        raise DocError(doc_command, exc.format_message()) from None
    except SubspaceError as exc:
        raise DocError(doc_command, f"exit {exc.exit_code}: {exc}") from None
