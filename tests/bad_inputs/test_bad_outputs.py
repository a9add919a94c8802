"""Bad --out (and other written paths) for the verbs that write: compress, adapt, merge, unlearn.
An output that would overwrite, contain or sit inside an input, an occupied output without
--overwrite, a file, a path under a file. Expected: exit 2, one `error:` line, nothing written
and every input byte-identical."""

from __future__ import annotations

import pytest

from bad_input_harness import Case, params, run_case, std

pytestmark = pytest.mark.slow  # the bad-input sweep (hundreds of CLI runs) is the slow tier

WRITERS = ("compress", "adapt", "merge", "unlearn")


def _model_ref(argv: list, verb: str) -> str:
    """The (first) model the argv reads: the merge base, or the positional model."""
    return argv[argv.index("--base") + 1] if verb == "merge" else argv[0]


def _data_ref(argv: list, verb: str) -> str:
    flag = {"compress": "--calib", "adapt": "--data", "unlearn": "--forget"}[verb]
    return argv[argv.index(flag) + 1]


def _with_out(verb: str, out_of, *extra: str):
    """argv with --out set to out_of(ctx, argv) (which may create things), plus extra flags."""

    def build(ctx):
        argv = std(ctx, verb)
        argv[argv.index("--out") + 1] = out_of(ctx, argv)
        return argv + list(extra)

    return build


def _occupied(ctx, name: str) -> str:
    ctx.write(f"{name}/keep.txt", "an earlier result\n")
    return name


def _out_cases(verb: str) -> list[Case]:
    model = lambda ctx, argv: _model_ref(argv, verb)  # noqa: E731
    cases = [
        Case(verb, "out-is-model", _with_out(verb, model)),
        Case(verb, "out-is-model-overwrite", _with_out(verb, model, "--overwrite")),
        Case(verb, "out-is-model-absolute-overwrite",
             _with_out(verb, lambda ctx, argv: ctx.absolute(_model_ref(argv, verb)), "--overwrite")),
        Case(verb, "out-is-model-trailing-slash-overwrite",
             _with_out(verb, lambda ctx, argv: _model_ref(argv, verb) + "/", "--overwrite")),
        Case(verb, "out-is-model-dotted-overwrite",
             _with_out(verb, lambda ctx, argv: f"./{ctx.mkdir('sub')}/../{_model_ref(argv, verb)}", "--overwrite")),
        Case(verb, "out-inside-model", _with_out(verb, lambda ctx, argv: f"{_model_ref(argv, verb)}/sub")),
        Case(verb, "out-inside-model-overwrite",
             _with_out(verb, lambda ctx, argv: f"{_model_ref(argv, verb)}/sub", "--overwrite")),
        Case(verb, "out-is-cwd-overwrite", _with_out(verb, lambda ctx, argv: ".", "--overwrite")),
        Case(verb, "out-is-cwd-absolute-overwrite", _with_out(verb, lambda ctx, argv: str(ctx.root), "--overwrite")),
        Case(verb, "out-empty-string", _with_out(verb, lambda ctx, argv: "")),
        Case(verb, "out-existing-file", _with_out(verb, lambda ctx, argv: ctx.write("result.bin", b"\x00\x01"))),
        Case(verb, "out-existing-file-overwrite",
             _with_out(verb, lambda ctx, argv: ctx.write("result.bin", b"\x00\x01"), "--overwrite")),
        Case(verb, "out-non-empty", _with_out(verb, lambda ctx, argv: _occupied(ctx, "occupied"))),
        Case(verb, "out-non-empty-hidden-file",
             _with_out(verb, lambda ctx, argv: ctx.write("hidden/.keep", "") and "hidden")),
        Case(verb, "out-parent-is-file", _with_out(verb, lambda ctx, argv: ctx.write("afile", "x\n") + "/out")),
        Case(verb, "out-grandparent-is-file",
             _with_out(verb, lambda ctx, argv: ctx.write("afile", "x\n") + "/deeper/out")),
        Case(verb, "out-symlink-to-model-overwrite", _with_out(verb, _symlink_to_model(verb), "--overwrite")),
    ]
    if verb != "merge":
        data = lambda ctx, argv: _data_ref(argv, verb)  # noqa: E731
        cases += [
            Case(verb, "out-is-data-file", _with_out(verb, data)),
            Case(verb, "out-is-data-file-overwrite", _with_out(verb, data, "--overwrite")),
            Case(verb, "out-is-data-dir-overwrite", _data_dir_build(verb)),
        ]
    # The model inside --out: --out is an ancestor of the model (with --overwrite it would be deleted).
    cases.append(Case(verb, "out-is-parent-of-model-overwrite", _parent_of_model_build(verb)))
    return cases


def _symlink_to_model(verb: str):
    def make(ctx, argv):
        ctx.path("link").symlink_to(ctx.path(_model_ref(argv, verb)), target_is_directory=True)
        return "link"

    return make


def _data_dir_build(verb: str):
    """--out is the directory the data file lives in."""

    def build(ctx):
        argv = std(ctx, verb)
        flag = {"compress": "--calib", "adapt": "--data", "unlearn": "--forget"}[verb]
        argv[argv.index(flag) + 1] = ctx.text("corpus/data.txt")
        argv[argv.index("--out") + 1] = "corpus"
        return argv + ["--overwrite"]

    return build


def _parent_of_model_build(verb: str):
    def build(ctx):
        if verb == "merge":
            argv = [ctx.model("ft1", "work/ft1"), ctx.model("ft2"), "--base", ctx.model("llama", "work/base")]
            return argv + ["--out", "work", "--overwrite"]
        argv = std(ctx, verb, model=ctx.model("llama", "work/model"))
        argv[argv.index("--out") + 1] = "work"
        return argv + ["--overwrite"]

    return build


CASES: list[Case] = [case for verb in WRITERS for case in _out_cases(verb)]


def _merge_out(which: int, overwrite: bool):
    def build(ctx):
        argv = std(ctx, "merge")
        argv[argv.index("--out") + 1] = argv[which]
        return argv + (["--overwrite"] if overwrite else [])

    return build


CASES += [
    Case("merge", "out-is-first-input", _merge_out(0, False)),
    Case("merge", "out-is-first-input-overwrite", _merge_out(0, True)),
    Case("merge", "out-is-second-input-overwrite", _merge_out(1, True)),
    Case("merge", "out-inside-second-input-overwrite",
         lambda ctx: std(ctx, "merge", out="ft2/merged", extra=["--overwrite"])),
]


def _resume_build(out_is: str):
    def build(ctx):
        ckpt = ctx.model("ckpt", "model.checkpoints")
        out = {"resume": f"{ckpt}/step-000001", "resume-parent": ckpt,
               "inside-resume": f"{ckpt}/step-000001/out"}[out_is]
        return std(ctx, "adapt", out=out, extra=["--resume", f"{ckpt}/step-000001", "--overwrite"])

    return build


def _checkpoint_dir_build(where: str):
    def build(ctx):
        argv = std(ctx, "adapt")
        target = {"model": argv[0], "data": argv[argv.index("--data") + 1], "out": "out",
                  "file": ctx.write("ckpt-file", "x\n"), "under-file": ctx.write("ckpt-file", "x\n") + "/sub"}[where]
        return argv + ["--save-every", "1", "--checkpoint-dir", target]

    return build


CASES += [
    Case("adapt", "out-is-resume-dir", _resume_build("resume")),
    Case("adapt", "out-is-resume-checkpoint-root", _resume_build("resume-parent")),
    Case("adapt", "out-inside-resume-dir", _resume_build("inside-resume")),
    Case("adapt", "checkpoint-dir-is-model", _checkpoint_dir_build("model")),
    Case("adapt", "checkpoint-dir-is-data-file", _checkpoint_dir_build("data")),
    Case("adapt", "checkpoint-dir-is-out", _checkpoint_dir_build("out")),
    Case("adapt", "checkpoint-dir-is-file", _checkpoint_dir_build("file")),
    Case("adapt", "checkpoint-dir-parent-is-file", _checkpoint_dir_build("under-file")),
    Case("unlearn", "out-is-retain-file-overwrite", lambda ctx: std(
        ctx, "unlearn", out=ctx.text("retain.txt", "kept text\n" * 300), retain="retain.txt", extra=["--overwrite"])),
    Case("unlearn", "out-is-eval-forget-overwrite", lambda ctx: std(
        ctx, "unlearn", out="heldout", extra=["--eval-forget", ctx.text("heldout/f.txt"), "--overwrite"])),
    Case("compress", "out-is-eval-data-dir-overwrite", lambda ctx: std(
        ctx, "compress", out="evaldir", extra=["--eval", ctx.text("evaldir/e.txt"), "--overwrite"])),
]


@pytest.mark.parametrize("case,as_json", params(CASES))
def test_bad_output(case, as_json, bad_ctx):
    run_case(case, as_json, bad_ctx)
