"""The shell commands shown in Markdown docs, as argument lists (for tests/test_docs.py).

Where commands come from:
- ```bash, ```sh, ```shell and ```console code blocks;
- ```yaml blocks that are CI configurations: each `run:` script of a GitHub Actions workflow
  (`jobs.*.steps[*].run`) and each `before_script` / `script` / `after_script` of a GitLab job.

A shell line is split the way bash would split it, closely enough for documentation: backslash
continuations are joined, `# comments` (a `#` starting a word outside quotes) are dropped,
`|`, `||`, `&&`, `;` and `&` separate commands, redirections (`> file`, `2>&1`) are dropped with
their target, and leading `NAME=value` assignments are kept apart from the command (a line that
is only assignments, like `status=$?`, runs nothing and yields no command). Variables are left
as written; the checker decides what `$RUNNER_TEMP` stands for.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SEPARATORS = {"|", "||", "&&", ";", "&", "|&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FD_BEFORE_REDIRECT = re.compile(r"(?<=\s)\d(?=[<>])")  # the 2 of `2>&1`, which shlex would keep as a word


@dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the command's first physical line in the doc
    text: str  # the whole shell line, continuations joined
    argv: tuple[str, ...]
    env: tuple[str, ...] = ()  # leading NAME=value assignments

    @property
    def program(self) -> str:
        return self.argv[0]

    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


def code_blocks(lines: list[str]) -> Iterator[tuple[str, int, list[str]]]:
    """(language, 1-based line of the block's first content line, content lines) per fenced block."""
    language, start, body = None, 0, []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if language is None:
                language, start, body = line.lstrip()[3:].strip().lower(), number + 1, []
            else:
                yield language, start, body
                language = None
        elif language is not None:
            body.append(line)


def logical_lines(lines: list[str], first: int) -> Iterator[tuple[int, str]]:
    """(line number of the first physical line, text) with backslash continuations joined."""
    pending, start = "", first
    for number, line in enumerate(lines, first):
        if not pending:
            start = number
        code = strip_comment(line).rstrip()
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            yield start, text
    if pending.strip():
        yield start, pending.strip()


def strip_comment(line: str) -> str:
    """line without a trailing `# comment` (a `#` that starts a word outside quotes, as in bash)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def simple_commands(text: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """[(argv, env assignments)] of the simple commands in one shell line."""
    lexer = shlex.shlex(FD_BEFORE_REDIRECT.sub("", strip_comment(text)), posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    commands, words, skip_target = [], [], False
    for token in lexer:
        if skip_target:
            skip_target = False
            continue
        if token in SEPARATORS:
            commands.append(words)
            words = []
        elif set(token) <= set("<>&|;()"):  # a redirection operator: drop it and its target
            skip_target = ">" in token or "<" in token
        else:
            words.append(token)
    commands.append(words)
    result = []
    for words in commands:
        env = tuple(w for w in _leading(words, ASSIGNMENT.match))
        argv = tuple(words[len(env):])
        if argv:
            result.append((argv, env))
    return result


def _leading(words: list[str], predicate) -> Iterator[str]:
    for word in words:
        if not predicate(word):
            return
        yield word


def ci_scripts(body: list[str]) -> list[str]:
    """The shell scripts of a GitHub Actions workflow or GitLab CI file held in a yaml block."""
    try:
        data = yaml.safe_load("\n".join(body))
    except yaml.YAMLError:
        return []
    if not isinstance(data, dict):
        return []
    scripts: list[str] = []
    for job in (data.get("jobs") or {}).values() if isinstance(data.get("jobs"), dict) else ():
        scripts += [step["run"] for step in job.get("steps", []) if isinstance(step, dict) and "run" in step]
    for job in data.values():  # GitLab: top-level jobs with script lists
        if isinstance(job, dict):
            for key in ("before_script", "script", "after_script"):
                part = job.get(key)
                scripts += part if isinstance(part, list) else [part] if isinstance(part, str) else []
    return scripts


def _script_lines(script: str, body: list[str], first: int, cursor: list[int]) -> Iterator[tuple[int, str]]:
    """The logical lines of one CI script, each numbered by the doc line that holds its first
    physical line (searched from `cursor`, so a line repeated in two steps is found twice)."""
    physical = script.splitlines()
    for offset, text in logical_lines(physical, 0):
        needle = physical[offset].strip()
        number = first + cursor[0]
        for i in range(cursor[0], len(body)):
            if needle in body[i]:
                number, cursor[0] = first + i, i + 1
                break
        yield number, text


def extract(path: Path, root: Path) -> list[Command]:
    """Every simple command of the shell blocks (and CI yaml blocks) of one Markdown file."""
    doc = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Command] = []
    for language, first, body in code_blocks(lines):
        if language in SHELL_LANGUAGES:
            shell = logical_lines(body, first)
        elif language in ("yaml", "yml"):
            cursor = [0]
            shell = (item for script in ci_scripts(body) for item in _script_lines(script, body, first, cursor))
        else:
            continue
        for number, text in shell:
            for argv, env in simple_commands(text):
                found.append(Command(doc, number, text, argv, env))
    return found
