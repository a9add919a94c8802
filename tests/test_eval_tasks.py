"""`eval --tasks`: zero-shot tasks built from held-out text (issue 19, part 2).

The examples must be what the text says (the true last word, the true continuation among others
of the same length), and the scores must be accuracies: an oracle that knows the text scores 1,
one that avoids exactly the text scores 0.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from cli_runner import run_cli
from transformers import AutoTokenizer

from subspace_cli.evaluate.tasks import (
    CHOICES,
    CONTEXT_WORDS,
    CONTINUATION_WORDS,
    MIN_WORD_CHARS,
    build,
    cloze_examples,
    lambada_examples,
    score,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def words(text_file):
    return text_file.read_text().split()


def test_lambada_asks_the_true_next_word(tokenizer, words):
    examples = lambada_examples(tokenizer, words, 10, prefix=(7,))
    assert 0 < len(examples) <= 10
    for example in examples:
        assert example.context[0] == 7 and example.answer == 0 and len(example.choices) == 1
        word = tokenizer.decode(example.choices[0])
        assert word.startswith(" ") and word[1:].isalpha() and len(word) - 1 >= MIN_WORD_CHARS
        context = tokenizer.decode(example.context[1:]).split()
        assert len(context) == CONTEXT_WORDS
        at = next(i for i in range(CONTEXT_WORDS, len(words)) if words[i - CONTEXT_WORDS:i] == context)
        assert words[at] == word[1:]  # the word that follows that context in the text


def test_cloze_hides_the_true_continuation_among_same_length_spans(tokenizer, words):
    examples = cloze_examples(tokenizer, words, 8, prefix=())
    assert 0 < len(examples) <= 8
    assert examples == cloze_examples(tokenizer, words, 8, prefix=())  # deterministic
    assert {e.answer for e in examples} == set(range(min(CHOICES, len(examples))))  # the answer's place rotates
    text = " ".join(words)
    for example in examples:
        assert len(example.choices) == CHOICES
        spans = [tokenizer.decode(c) for c in example.choices]
        assert all(len(s.split()) == CONTINUATION_WORDS for s in spans)
        true = tokenizer.decode(example.context) + spans[example.answer]
        assert true.strip() in text  # context + answer is running text
        assert len(set(spans)) == CHOICES


class Oracle(torch.nn.Module):
    """Logits that put the true texts' next token first (sign +1: it has memorised them) or last
    (sign -1: it avoids exactly what the text says)."""

    def __init__(self, examples, vocab, sign=1.0):
        super().__init__()
        self.vocab, self.sign, self.next = vocab, sign, {}
        for e in examples:
            ids = e.context + e.choices[e.answer]
            for t in range(1, len(ids)):
                self.next[tuple(ids[:t])] = ids[t]

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            for t in range(int(attention_mask[row].sum())):
                known = self.next.get(tuple(ids[:t + 1]))
                if known is not None:
                    logits[row, t, known] = 30.0 * self.sign
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("name", ["lambada", "cloze"])
def test_accuracy_is_one_for_an_oracle_and_zero_for_its_opposite(tokenizer, text_file, name):
    examples = build(name, tokenizer, text_file.read_text(), 12, (), "the text")
    assert score(Oracle(examples, len(tokenizer)), name, examples, "cpu") == 1.0
    assert score(Oracle(examples, len(tokenizer), sign=-1.0), name, examples, "cpu") == 0.0


def test_batched_scoring_is_unpadded_scoring(tiny_llama, tokenizer, text_file):
    """Right padding never reaches a score: each sequence's logits in a batch are its own, 1e-5."""
    from subspace_cli.evaluate.tasks import _continuation_logits
    from subspace_cli.modules.loading import load_model

    model = load_model(tiny_llama)
    examples = build("cloze", tokenizer, text_file.read_text(), 3, (), "the text")
    sequences = [(e.context, c) for e in examples for c in e.choices]
    assert len({len(c) for _, c in sequences}) > 1  # lengths differ: the batch is padded
    batched = _continuation_logits(model, sequences, "cpu")
    for seq, got in zip(sequences, batched):
        torch.testing.assert_close(got, _continuation_logits(model, [seq], "cpu")[0], atol=1e-5, rtol=0)


def test_eval_reports_tasks_and_gates_on_them(tiny_llama, text_file):
    args = ["eval", tiny_llama, "--data", text_file, "--split", "all", "--eval-seqlen", "32", "--tasks",
            "lambada,cloze", "--task-examples", "6", "--baseline", tiny_llama, "--json"]
    result = run_cli(*args, "--fail-if", "cloze.acc_ratio<0.99")
    assert result.returncode == 0, result.stderr
    tasks = json.loads(result.stdout)["tasks"]
    assert set(tasks) == {"lambada", "cloze"} and tasks["cloze"]["chance"] == 1 / CHOICES
    assert tasks["cloze"]["acc"] == tasks["cloze"]["baseline_acc"] and tasks["cloze"]["acc_ratio"] == 1.0
    assert 0 < tasks["lambada"]["n"] <= 6 and 0.0 <= tasks["lambada"]["acc"] <= 1.0
    failing = run_cli(*args, "--fail-if", "cloze.acc>=0")
    assert failing.returncode == 1 and "cloze.acc>=0" in failing.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--tasks", "lambda"], "unknown task 'lambda' (did you mean 'lambada'?)"),
    (["--tasks", "cloze", "--fail-if", "cloze.acc_ratio<0.9"], "needs --baseline"),
    (["--tasks", "cloze", "--fail-if", "lambada.acc<0.9"], "lambada.acc"),
])
def test_bad_task_input_exits_2(tiny_llama, text_file, args, fragment):
    result = run_cli("eval", tiny_llama, "--data", text_file, *args)
    assert result.returncode == 2 and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_text_too_short_for_a_task_exits_2(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here, " * 30)
    result = run_cli("eval", tiny_llama, "--data", short, "--split", "all", "--eval-seqlen", "16", "--tasks", "cloze")
    assert result.returncode == 2 and "too short to build any example" in result.stderr
