"""`--tasks` on the verbs that transform a model (compress, heal, unlearn, merge) and the greedy
samples in their reports: every model the verb reads or writes is scored on the same examples of
each evaluation text, and a model scored twice gets the same accuracy as `subspace eval` gives it.
"""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli
from matrix_helpers import RETAIN_TEXT
from tiny_models import TEXT, perturbed_copy, write_text

from subspace_cli.evaluate.samples import PROMPTS

TASKS = ("--tasks", "lambada,cloze", "--task-examples", "6")


@pytest.fixture
def text_file(tmp_path):
    """A text whose held-out 5% holds a few task examples (each needs 60 words)."""
    return write_text(tmp_path / "long.txt", TEXT * 8)


def _eval_acc(model, text, task) -> float:
    result = run_cli("eval", model, "--data", text, "--tasks", task, "--task-examples", "6", "--eval-seqlen", "32",
                     "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["tasks"][task]["acc"]


def _check_table(report, sources, labels):
    tasks = report["tasks"]
    assert set(tasks) == set(sources)
    for rows in tasks.values():
        assert set(rows) == {"lambada", "cloze"}
        for row in rows.values():
            assert set(row["acc"]) == set(labels) and 0 < row["n"] <= 6
            assert all(0.0 <= acc <= 1.0 for acc in row["acc"].values())


def _check_samples(report, labels):
    assert [s["prompt"] for s in report["samples"]] == list(PROMPTS)
    assert all(set(s["outputs"]) == set(labels) for s in report["samples"])


def test_compress_scores_the_dense_and_the_compressed_model_like_eval(tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("compress", tiny_llama, "--calib", text_file, "--out", out, "--calib-samples", "8",
                     "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-chars", "2000", "--quiet", *TASKS)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    _check_table(report, [str(text_file)], ["dense", "compressed"])
    _check_samples(report, ["dense", "compressed"])
    row = report["tasks"][str(text_file)]["cloze"]
    # The same examples eval builds from the same held-out text: the same accuracy for both models.
    assert row["acc"]["dense"] == _eval_acc(tiny_llama, text_file, "cloze")
    assert row["acc"]["compressed"] == _eval_acc(out, text_file, "cloze")
    markdown = (out / "report.md").read_text()
    assert "## Task accuracy" in markdown and "## Greedy samples" in markdown


def test_unlearn_scores_forget_and_retain_before_and_after(tiny_llama, text_file, tmp_path):
    forget, retain = text_file, write_text(tmp_path / "retain.txt", RETAIN_TEXT * 40)
    out = tmp_path / "out"
    result = run_cli("unlearn", tiny_llama, "--forget", forget, "--retain", retain, "--out", out, "--forget-samples",
                     "8", "--retain-samples", "8", "--seqlen", "32", "--eval-seqlen", "32", "--eval-chars", "1500",
                     "-O", "steps=2", "-O", "layer=1", "-O", "batch_size=2", "--quiet", *TASKS)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    _check_table(report, ["forget", "retain"], ["before", "after"])
    _check_samples(report, ["before", "after"])


def test_merge_scores_every_model_on_each_eval_text(tiny_llama, text_file, tmp_path):
    a, b = perturbed_copy(tiny_llama, tmp_path / "a", 1), perturbed_copy(tiny_llama, tmp_path / "b", 2)
    out = tmp_path / "out"
    result = run_cli("merge", a, b, "--base", tiny_llama, "--out", out, "--eval", f"one={text_file}",
                     "--eval-seqlen", "32", "--eval-chars", "2000", "--quiet", *TASKS)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    _check_table(report, ["one"], ["merged", "base", str(a), str(b)])
    assert report["tasks"]["one"]["cloze"]["acc"]["base"] == _eval_acc(tiny_llama, text_file, "cloze")


@pytest.mark.parametrize("args, message", [
    (("merge", "A", "B", "--base", "M", "--tasks", "lambada"), "pass --eval too"),
    (("compress", "M", "--tasks", "lambda"), "lambada"),  # unknown task: did you mean
    (("unlearn", "M", "--forget", "F", "--retain", "R", "--tasks", "nope"), "nope"),
])
def test_bad_tasks_exit_2_before_loading(tiny_llama, text_file, tmp_path, args, message):
    replace = {"A": tiny_llama, "B": tiny_llama, "M": tiny_llama, "F": text_file, "R": tmp_path / "r.txt"}
    write_text(tmp_path / "r.txt", RETAIN_TEXT)
    result = run_cli(*[replace.get(a, a) for a in args], "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_lm_eval_task_runs_once_per_model_in_compress(tiny_llama, text_file, tmp_path):
    pytest.importorskip("lm_eval")
    from test_eval_lm_eval import KEY, ROWS, accuracy_by_hand, write_task

    task = write_task(tmp_path / "tasks")
    out = tmp_path / "out"
    result = run_cli("compress", tiny_llama, "--calib", text_file, "--out", out, "--calib-samples", "8",
                     "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-chars", "2000", "--quiet",
                     "--tasks", f"lm-eval:{task}")
    assert result.returncode == 0, result.stderr
    table = json.loads((out / "report.json").read_text())["tasks"]
    assert set(table) == {"lm-eval"}  # its own data: not once per evaluation text
    row = table["lm-eval"][KEY]
    assert row["n"] == len(ROWS)
    assert row["acc"]["dense"] == pytest.approx(accuracy_by_hand(tiny_llama), abs=1e-9)
    assert row["acc"]["compressed"] == pytest.approx(accuracy_by_hand(out), abs=1e-9)
