"""The docs cannot rot: every command they show is exercised here, and every link resolves.

Commands come from the README and docs/*.md: shell code blocks, and the `run:` scripts of the
CI workflow in docs/ci.md (tests/doc_commands.py extracts them). Each is checked by what it
starts:

- `subspace ...` (also `python -m subspace_cli`, and under `torchrun` / `accelerate launch`,
  whose own argument parsers read the launcher's flags): the real typer command parses it, the
  verb's callback builds its config (unknown flags, bad values, unknown methods and options,
  ratio or density out of range all fail here, as they would for a user), then the pre-load
  checks of `subspace run --dry-run` run on it, and `builtin:` names must exist. `subspace run`
  always runs as a dry run; `subspace methods` and `subspace schema` run for real. No weights
  are loaded: running the heavy commands for real is what the recipe tests, the 2-process tests
  and `make demo` do.
- `make TARGET`: the target exists in the Makefile.
- the shell and CI utilities in OTHER_PROGRAMS: allowed as they are. Any other program fails,
  so a new kind of command in the docs needs a decision here.

Synopsis placeholders (`MODEL`, `DIR`, `--method M`, `CONFIG.yaml`, `...`) are resolved as
tests/doc_checks.py says. Environment variables (`$RUNNER_TEMP`) become fresh directories.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from doc_checks import REPO, DocError, check_subspace, subspace_argv
from doc_commands import Command, extract, simple_commands

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = [command for doc in DOCS for command in extract(doc, REPO)]
# Programs the docs may show that are not this tool: checked by their presence in this list only.
OTHER_PROGRAMS = {"echo", "jq", "cp", "cat", "exit"}
MAKE_TARGETS = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
# A guide per verb, the checkpoint format, CI integration and troubleshooting (issue 7).
REQUIRED_PAGES = ["compress", "adapt", "merge", "unlearn", "inspect-and-eval", "recipes", "format", "ci",
                  "troubleshooting"]


def _ids(commands: list[Command]) -> list[str]:
    return [f"{c.doc}:{c.line}:{c.program}" for c in commands]


def _is_pip(command: Command) -> bool:
    return command.argv[:3] in (("python", "-m", "pip"), ("python3", "-m", "pip")) or command.program == "pip"


def check_command(command: Command, workdir: Path, commands: list[Command]) -> None:
    if subspace_argv(command) is not None:
        check_subspace(command, workdir, commands)
    elif command.program == "make":
        missing = [t for t in command.argv[1:] if not t.startswith("-") and t not in MAKE_TARGETS]
        if missing:
            raise DocError(command, f"no Makefile target {missing}; targets: {sorted(MAKE_TARGETS)}")
    elif not (_is_pip(command) or command.program in OTHER_PROGRAMS):
        raise DocError(command, f"program {command.program!r} is not checked by tests/test_docs.py: "
                                "add a check, or list it in OTHER_PROGRAMS")


def test_docs_show_commands_of_every_kind():
    """Guards the extraction itself: a parser change that found nothing would pass every test below."""
    programs = {c.program for c in COMMANDS}
    assert {"subspace", "torchrun", "accelerate", "make"} <= programs
    verbs = {subspace_argv(c)[0] for c in COMMANDS if subspace_argv(c)}
    assert {"compress", "adapt", "merge", "unlearn", "eval", "inspect", "run", "schema", "methods"} <= verbs
    assert any(c.doc == "docs/ci.md" and "--fail-if" in c.argv for c in COMMANDS), "the CI workflow's gate step"


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command(command, tmp_path):
    check_command(command, tmp_path, COMMANDS)


@pytest.mark.parametrize("page", REQUIRED_PAGES)
def test_page_exists_and_the_readme_links_it(page):
    assert (REPO / "docs" / f"{page}.md").is_file()
    assert f"(docs/{page}.md)" in (REPO / "README.md").read_text()


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_relative_links_resolve(doc):
    text = doc.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path) if path else doc
        assert resolved.exists(), f"{doc.name}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{doc.name}: no heading #{anchor} in {path or doc.name}"


# ----------------------------------------------------------------------------- the checker catches rot


def _doc(tmp_path: Path, body: str) -> list[Command]:
    (tmp_path / "docs").mkdir(exist_ok=True)
    page = tmp_path / "docs" / "page.md"
    page.write_text(f"# page\n\n```bash\n{body}\n```\n")
    return extract(page, tmp_path)


@pytest.mark.parametrize("line, problem", [
    ("subspace compress MODEL --ratoi 0.2 --out DIR", r"No such option: --ratoi"),
    ("subspace compress MODEL --method svd-lm --out DIR", r"svd-lm"),
    ("subspace compress MODEL --ratio 1.5 --out DIR", r"ratio"),
    ("subspace compress MODEL -O no_such_option=1 --out DIR", r"no_such_option"),
    ("subspace merge --base BASE MODEL_A MODEL_B --method ties --density 2 --out DIR", r"density"),
    ("subspace eval MODEL --data builtin:shakespear", r"shakespear"),
    ("subspace compress builtin:smollm3 --out DIR", r"unknown builtin model"),
    ("subspace run recipes/no-such-recipe.yaml", r"does not exist in the repository"),
    ("subspace compres MODEL --out DIR", r"unknown verb 'compres'"),
    ("torchrun --nproc-per-node 2 train.py", r"does not start `-m subspace_cli`"),
    ("accelerate launch --multi_gpu --num_processes 2 -m subspace_cli compress MODEL --raito 1 --out DIR",
     r"No such option: --raito"),
    ("subspace compress MODELS --out DIR", r"unknown placeholder 'MODELS'"),
    ("make benchmark", r"no Makefile target \['benchmark'\]"),
    ("curl https://example.com", r"program 'curl' is not checked"),
])
def test_a_broken_command_fails_and_names_its_line(tmp_path, line, problem):
    commands = _doc(tmp_path, f"# a comment line\n{line}")
    assert len(commands) == 1 and commands[0].line == 5
    with pytest.raises(DocError, match=problem) as caught:
        check_command(commands[0], tmp_path / "work", commands)
    assert "docs/page.md:5:" in str(caught.value)


def test_a_command_reading_the_recipe_another_command_wrote(tmp_path):
    commands = _doc(tmp_path, "subspace compress MODEL --ratio 0.3 --out runs/c\n"
                              "subspace run runs/c/recipe.yaml --set ratio=0.4 --dry-run")
    check_command(commands[1], tmp_path / "work", commands)


# ----------------------------------------------------------------------------- extraction


def test_shell_lines_are_split_as_bash_would():
    assert simple_commands("A=1 B=2 subspace eval M --data 'x y' 2>&1 | tee log && echo done # note") == [
        (("subspace", "eval", "M", "--data", "x y"), ("A=1", "B=2")), (("tee", "log"), ()), (("echo", "done"), ())]
    assert simple_commands("status=$?") == []
    assert simple_commands("subspace schema > recipe.schema.json; exit $status") == [
        (("subspace", "schema"), ()), (("exit", "$status"), ())]


def test_continuations_comments_and_ci_run_scripts(tmp_path):
    (tmp_path / "ci.md").write_text(
        "```bash\nsubspace compress MODEL \\\n    --out DIR   # trailing\n```\n\n"
        "```yaml\njobs:\n  a:\n    steps:\n      - uses: actions/checkout@v4\n      - run: |\n"
        "          subspace eval \\\n            DIR --data D\n          echo ok\n```\n\n"
        "```python\nsubspace = 1\n```\n")
    found = [(c.line, c.argv) for c in extract(tmp_path / "ci.md", tmp_path)]
    assert found == [(2, ("subspace", "compress", "MODEL", "--out", "DIR")),
                     (12, ("subspace", "eval", "DIR", "--data", "D")), (14, ("echo", "ok"))]
