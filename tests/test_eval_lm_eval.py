"""`eval --tasks lm-eval:...`: lm-evaluation-harness tasks scored on the model eval loaded.

A local multiple-choice task (a YAML over a jsonl, no network) must be scored on the loaded model
itself: its accuracy is the one recomputed by hand from that model's log-likelihoods, and a model
against itself as --baseline has baseline_acc == acc exactly. Bad task input exits 2 in one line
before any weights load.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_runner import run_cli

pytest.importorskip("lm_eval")

# Three choices each, the answer's place rotating; the tiny random model finds some of them.
ROWS = [{"question": f"Q{i}: after {w} comes", "choices": [f"{w}s", f"{w}{i}", "the end"], "label": i % 3}
        for i, w in enumerate(["ab", "cd", "ef", "gh", "ij", "kl", "mn"])]
KEY = "lm-eval:tiny_qa"


def write_task(folder, name: str = "tiny_qa", rows=ROWS):
    """An lm-eval multiple_choice task YAML over a local jsonl, in a folder of its own; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / f"{name}.yaml"
    path.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    return path


@pytest.fixture
def task_yaml(tmp_path):
    return write_task(tmp_path / "tasks")


def eval_args(model, text_file, *extra):
    return ["eval", model, "--data", text_file, "--split", "all", "--eval-seqlen", "32", "--eval-chars", "400", *extra]


def accuracy_by_hand(model_dir) -> float:
    """lm-eval's multiple_choice acc, recomputed: the choice (after a space) of highest summed token
    log-likelihood given the question, against the label."""
    from subspace_cli.modules.loading import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(str(model_dir), device="cpu", dtype="float32", allow_pickle=False)
    hits = 0
    for row in ROWS:
        context = loaded.tokenizer(row["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            target = loaded.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([context + target])).logits[0, :-1]  # [L-1, V]
            logp = torch.log_softmax(logits.float(), -1)[len(context) - 1:]  # rows predicting the choice
            scores.append(logp.gather(1, torch.tensor(target)[:, None]).sum().item())
        hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return hits / len(ROWS)


@pytest.mark.slow
def test_a_local_task_is_scored_on_the_loaded_model(tiny_llama, text_file, task_yaml):
    result = run_cli(*eval_args(tiny_llama, text_file, "--tasks", f"lm-eval:{task_yaml}", "--baseline", tiny_llama,
                                "--fail-if", f"{KEY}.acc>2", "--json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    entry = summary["tasks"][KEY]
    assert entry["n"] == len(ROWS) and entry["metric"] == "acc" and entry["yaml"] == str(task_yaml.resolve())
    assert 0.0 <= entry["acc"] <= 1.0
    assert entry["acc"] == accuracy_by_hand(tiny_llama)  # lm-eval scored this model, not another
    assert entry["chance"] == pytest.approx(1 / 3, abs=1e-12)  # three choices each
    assert entry["baseline_acc"] == entry["acc"]  # the same model as baseline: the same examples, the same answers
    assert entry["acc_ratio"] == (1.0 if entry["acc"] else None)  # 0 / 0 is NaN, null in JSON
    assert summary["gates"][0]["field"] == f"{KEY}.acc" and summary["ok"]


def test_task_examples_is_the_limit_and_gates_read_the_task(tiny_llama, text_file, task_yaml):
    result = run_cli(*eval_args(tiny_llama, text_file, "--tasks", f"lm-eval:{task_yaml},cloze", "--task-examples", "3",
                                "--fail-if", f"{KEY}.acc<2", "--json"))
    assert result.returncode == 1, result.stderr
    assert f"{KEY}.acc<2" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    summary = json.loads(result.stdout)
    assert summary["tasks"][KEY]["n"] == 3 and set(summary["tasks"]) == {KEY, "cloze"}
    assert summary["failed"][0]["field"] == f"{KEY}.acc"


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"),
    ("no-task", "has no task: key"),
    ("group", "group config"),
    ("gate-field", f"unknown field '{KEY}.f1'"),
    ("gate-baseline", "needs --baseline"),
    ("gate-syntax", "is not FIELD OP VALUE"),
])
def test_bad_task_input_exits_2_in_one_line(tiny_llama, text_file, task_yaml, tmp_path, case, fragment):
    spec, gate = f"lm-eval:{task_yaml}", []
    if case == "missing":
        spec = f"lm-eval:{tmp_path / 'nowhere' / 'task.yaml'}"
    elif case in ("no-task", "group"):
        bad = tmp_path / "bad" / "bad.yaml"
        bad.parent.mkdir()
        bad.write_text("dataset_path: json\noutput_type: multiple_choice\n" +
                       ("group: g\ntask: [tiny_qa]\n" if case == "group" else ""))
        spec = f"lm-eval:{bad}"
    else:
        gate = ["--fail-if", {"gate-field": f"{KEY}.f1>0", "gate-baseline": f"{KEY}.acc_ratio<0.9",
                              "gate-syntax": f"{KEY}.acc=>0.5"}[case]]
    result = run_cli(*eval_args(tiny_llama, text_file, "--tasks", spec, *gate))
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_lm_eval_the_fix_is_named(tiny_llama, text_file, task_yaml, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what find_spec sees when the package is absent
    result = run_cli(*eval_args(tiny_llama, text_file, "--tasks", f"lm-eval:{task_yaml}"))
    assert result.returncode == 2 and "pip install lm-eval==0.4.13" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_two_yamls_naming_one_task_are_refused(tiny_llama, text_file, tmp_path):
    first, second = write_task(tmp_path / "a"), write_task(tmp_path / "b")
    result = run_cli(*eval_args(tiny_llama, text_file, "--tasks", f"lm-eval:{first},lm-eval:{second}"))
    assert result.returncode == 2 and "both name lm-eval task 'tiny_qa'" in result.stderr


@pytest.mark.slow
def test_registry_names_unknown_or_not_downloaded_exit_2(tiny_llama, text_file):
    """The registry is indexed (seconds); the hub is never asked: a task whose data is not cached
    says to use a local task YAML."""
    unknown = run_cli(*eval_args(tiny_llama, text_file, "--tasks", "lm-eval:hellaswg"))
    assert unknown.returncode == 2 and "unknown lm-eval task 'hellaswg' (did you mean 'hellaswag'?)" in unknown.stderr
    from datasets import config

    if any(config.HF_DATASETS_CACHE.glob("Rowan___hellaswag*")):
        pytest.skip("hellaswag is in the local datasets cache")
    absent = run_cli(*eval_args(tiny_llama, text_file, "--tasks", "lm-eval:hellaswag"))
    assert absent.returncode == 2, absent.stderr
    assert "lm-eval:path/to/task.yaml" in absent.stderr and len(absent.stderr.strip().splitlines()) == 1


def test_a_failure_inside_lm_eval_exits_3_naming_the_stage(tiny_llama, text_file, task_yaml, monkeypatch):
    import lm_eval

    def broken(**_):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(lm_eval, "simple_evaluate", broken)
    result = run_cli(*eval_args(tiny_llama, text_file, "--tasks", f"lm-eval:{task_yaml}"))
    assert result.returncode == 3 and "tasks: lm-eval task 'tiny_qa' failed: RuntimeError: boom" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
