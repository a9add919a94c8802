"""Bad data for every verb that reads text: missing, empty, whitespace-only, binary / not UTF-8,
.jsonl that is not JSON or lacks the field, an empty directory, a directory of non-text files,
text too short for the sequence length. Expected: exit 2, one `error:` line, nothing written."""

from __future__ import annotations

import json

import pytest

from bad_input_harness import Case, params, run_case, std

pytestmark = pytest.mark.slow  # the bad-input sweep (hundreds of CLI runs) is the slow tier

BINARY = bytes(range(256)) * 40
LATIN1 = ("Ceci n'est pas de l'UTF-8: café, crème brûlée, naïveté.\n" * 200).encode("latin-1")

# kind -> builder(ctx) -> the data reference, created under the root.
BAD_DATA = {
    "missing": lambda ctx: "no-such-data.txt",
    "empty": lambda ctx: ctx.write("empty.txt", ""),
    "whitespace-only": lambda ctx: ctx.write("blank.txt", " \n\t\n   \n" * 300),
    "binary": lambda ctx: ctx.write("binary.txt", BINARY),
    "not-utf8": lambda ctx: ctx.write("latin1.txt", LATIN1),
    "jsonl-invalid": lambda ctx: ctx.write("bad.jsonl", '{"text": "fine"}\n{"text": "broken\n' + '{"text": "x"}\n' * 50),
    "jsonl-no-field": lambda ctx: ctx.write("nofield.jsonl", "".join(
        json.dumps({"body": f"line {i} of some text that is long enough"}) + "\n" for i in range(200))),
    "jsonl-not-objects": lambda ctx: ctx.write("lists.jsonl", "[1, 2, 3]\n" * 200),
    "jsonl-text-not-string": lambda ctx: ctx.write("numbers.jsonl", "".join(
        json.dumps({"text": i}) + "\n" for i in range(200))),
    "empty-dir": lambda ctx: ctx.mkdir("corpus"),
    "dir-without-txt": lambda ctx: ctx.write("corpus/notes.bin", BINARY) and "corpus",
    "too-short": lambda ctx: ctx.write("short.txt", "To be, or not.\n"),
    "builtin-unknown": lambda ctx: "builtin:no-such-corpus",
}

# Which flag of each verb takes the data (unlearn: --forget here; --retain below).
DATA_VERBS = ("compress", "adapt", "unlearn", "eval", "inspect")


def _data_case(verb: str, kind: str) -> Case:
    return Case(verb, f"data-{kind}", lambda ctx: std(ctx, verb, data=BAD_DATA[kind](ctx)))


CASES: list[Case] = [_data_case(verb, kind) for verb in DATA_VERBS for kind in BAD_DATA]

# unlearn --retain
for _kind in ("missing", "empty", "binary", "jsonl-invalid", "empty-dir", "too-short"):
    CASES.append(Case("unlearn", f"retain-{_kind}", lambda ctx, kind=_kind: std(ctx, "unlearn", retain=BAD_DATA[kind](ctx))))


def _extra_source(verb: str, flag: str, kind: str, prefix: str = "") -> Case:
    return Case(verb, f"{prefix}{flag.strip('-')}-{kind}", lambda ctx: std(ctx, verb, extra=[flag, BAD_DATA[kind](ctx)]))


CASES += [
    _extra_source("compress", "--eval", "missing"),
    _extra_source("compress", "--eval", "empty"),
    _extra_source("compress", "--eval", "binary"),
    _extra_source("unlearn", "--eval-forget", "missing"),
    _extra_source("unlearn", "--eval-retain", "empty"),
    _extra_source("unlearn", "--eval-retain", "binary"),
    # A second --calib / --data source that is bad, after a good one.
    _extra_source("compress", "--calib", "missing", "second-"),
    _extra_source("adapt", "--data", "empty", "second-"),
]


def _merge_concrete(kind: str) -> Case:
    def build(ctx):
        bad = BAD_DATA[kind](ctx)
        return std(ctx, "merge", extra=["--method", "concrete", "--data", ctx.text(), "--data", bad,
                                        "--samples", "2", "--seqlen", "16", "-O", "steps=2"])

    return Case("merge", f"concrete-data-{kind}", build)


def _merge_eval(kind: str) -> Case:
    return Case("merge", f"eval-{kind}", lambda ctx: std(
        ctx, "merge", extra=["--eval", f"task={BAD_DATA[kind](ctx)}", "--eval-seqlen", "32", "--eval-chars", "500"]))


CASES += [_merge_concrete(kind) for kind in ("missing", "empty", "binary", "jsonl-no-field", "too-short")]
CASES += [_merge_eval(kind) for kind in ("missing", "empty", "binary")]
CASES += [
    Case("merge", "eval-without-task-name", lambda ctx: std(ctx, "merge", extra=["--eval", ctx.text("e.txt")])),
    Case("merge", "concrete-one-source-for-two-models", lambda ctx: std(
        ctx, "merge", extra=["--method", "concrete", "--data", ctx.text(), "--samples", "2", "--seqlen", "16",
                             "-O", "steps=2"])),
    Case("merge", "concrete-without-data", lambda ctx: std(
        ctx, "merge", extra=["--method", "concrete", "--samples", "2", "--seqlen", "16", "-O", "steps=2"])),
    Case("adapt", "format-alpaca-on-text-jsonl", lambda ctx: std(
        ctx, "adapt", data=ctx.write("t.jsonl", "".join(json.dumps({"text": "some words " * 20}) + "\n"
                                                         for _ in range(100))), extra=["--format", "alpaca"])),
    Case("adapt", "chat-messages-not-a-list", lambda ctx: std(
        ctx, "adapt", data=ctx.write("chat.jsonl", "".join(json.dumps({"messages": "hello there"}) + "\n"
                                                           for _ in range(100))))),
]


@pytest.mark.parametrize("case,as_json", params(CASES))
def test_bad_data(case, as_json, bad_ctx):
    run_case(case, as_json, bad_ctx)
