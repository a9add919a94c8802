"""Zero-shot task checks beside perplexity, built offline from held-out text.

Perplexity alone can hide a broken model (a low perplexity with incoherent answers), so `eval
--tasks` also scores two tasks made from the same held-out text, for any language and domain:

- `lambada`: last-word prediction, after LAMBADA (Paperno et al. 2016, arXiv 1606.06031). Each
  example is CONTEXT_WORDS words of running text; the model must produce the next word by greedy
  decoding: every token of " word" the argmax given the context and the word's tokens before it.
  Words shorter than MIN_WORD_CHARS letters (articles, "I") are not asked.
- `cloze`: 4-way continuation choice, scored as HellaSwag and StoryCloze are in lm-evaluation-
  harness (Zellers et al. 2019, arXiv 1905.07830): the true next CONTINUATION_WORDS words of a
  passage against CHOICES − 1 spans of the same length from elsewhere in the text, by mean token
  log-likelihood; chance is 1 / CHOICES.

Examples are spread evenly over the text (deterministic: the same text gives the same examples)
and scored BATCH sequences per forward pass, right-padded: a causal model's positions before the
padding never see it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from subspace_cli.errors import UsageError, did_you_mean

TASKS = ("lambada", "cloze")
CONTEXT_WORDS = 48
CONTINUATION_WORDS = 12
CHOICES = 4
MIN_WORD_CHARS = 3
_WORD = re.compile(r"^[^\W\d_]+$")  # letters only (any script), no digits or punctuation


@dataclass(frozen=True)
class Example:
    context: list[int]  # token ids, the tokenizer's prefix (BOS) included
    choices: list[list[int]]  # token ids of each continuation
    answer: int  # index of the true one


def check_tasks(names: list[str]) -> list[str]:
    """The task names, each known (exit 2 naming the valid ones otherwise), without repeats.
    `lm-eval:` names pass through: evaluate/lm_eval_tasks.resolve checks them."""
    for name in names:
        if name not in TASKS and not name.startswith("lm-eval:"):
            raise UsageError(f"--tasks: unknown task '{name}'{did_you_mean(name, TASKS)}; valid: {', '.join(TASKS)}, "
                             "lm-eval:NAME, lm-eval:path/to/task.yaml")
    return list(dict.fromkeys(names))


def _split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]] | None:
    """Ids of `context` and of `continuation` as the tokenizer encodes them together (None when the
    boundary merges into one token, so the continuation has no tokens of its own)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[:len(head)] != head or len(whole) == len(head):
        return None
    return head, whole[len(head):]


def lambada_examples(tokenizer, words: list[str], n: int, prefix: tuple[int, ...]) -> list[Example]:
    """Up to `n` last-word examples spread over `words`."""
    targets = [i for i in range(CONTEXT_WORDS, len(words))
               if _WORD.match(words[i]) and len(words[i]) >= MIN_WORD_CHARS]
    examples = []
    for i in targets[:: max(1, len(targets) // n)][:n]:
        pair = _split(tokenizer, " ".join(words[i - CONTEXT_WORDS:i]), " " + words[i])
        if pair is not None:
            examples.append(Example([*prefix, *pair[0]], [pair[1]], 0))
    return examples


def cloze_examples(tokenizer, words: list[str], n: int, prefix: tuple[int, ...]) -> list[Example]:
    """Up to `n` continuation choices spread over `words`; distractors from a quarter, half and three
    quarters of the text further on (wrapping), so they never overlap the true span."""
    span = CONTEXT_WORDS + CONTINUATION_WORDS
    starts = list(range(0, len(words) - span + 1, span))
    if len(starts) < CHOICES:
        return []
    examples = []
    for k in range(0, len(starts), max(1, len(starts) // n)):
        if len(examples) == n:
            break
        start = starts[k]
        context = " ".join(words[start:start + CONTEXT_WORDS])
        spans = [starts[(k + j * len(starts) // CHOICES) % len(starts)] + CONTEXT_WORDS for j in range(CHOICES)]
        pairs = [_split(tokenizer, context, " " + " ".join(words[s:s + CONTINUATION_WORDS])) for s in spans]
        if any(p is None for p in pairs):
            continue
        answer = k % CHOICES  # the true span's place among the choices rotates
        choices = [p[1] for p in pairs[1:]]
        choices.insert(answer, pairs[0][1])
        examples.append(Example([*prefix, *pairs[0][0]], choices, answer))
    return examples


BUILDERS: dict[str, Callable] = {"lambada": lambada_examples, "cloze": cloze_examples}


BATCH = 8  # sequences per forward pass


@torch.no_grad()
def _continuation_logits(model, sequences: list[tuple[list[int], list[int]]], device) -> list[torch.Tensor]:
    """For each (context, continuation): the logits that predict the continuation's tokens [len, V].
    Sequences are right-padded into batches of BATCH; a causal model's positions before the padding
    do not see it, so each score is the unpadded one."""
    out = []
    for start in range(0, len(sequences), BATCH):
        batch = sequences[start:start + BATCH]
        length = max(len(c) + len(t) for c, t in batch) - 1  # inputs stop before the last token
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, (context, target) in enumerate(batch):
            seq = (context + target)[:-1]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [b, L, V]
        for row, (context, target) in enumerate(batch):
            end = len(context) + len(target) - 1
            out.append(logits[row, end - len(target):end].float())  # [len, V]
    return out


def score(model, name: str, examples: list[Example], device, progress: Callable[[], None] = lambda: None) -> float:
    """Accuracy of `model` on `examples` of task `name`: lambada, every target token the argmax;
    cloze, the choice of highest mean token log-likelihood."""
    hits = 0
    for start in range(0, len(examples), max(1, BATCH // len(examples[0].choices))):
        chunk = examples[start:start + max(1, BATCH // len(examples[0].choices))]
        sequences = [(e.context, choice) for e in chunk for choice in e.choices]
        logits = iter(_continuation_logits(model, sequences, device))
        for example in chunk:
            if name == "lambada":
                target = torch.tensor(example.choices[0], device=device)
                hits += bool((next(logits).argmax(-1) == target).all())
            else:
                means = []
                for choice in example.choices:
                    target = torch.tensor(choice, device=device)
                    means.append(torch.log_softmax(next(logits), -1).gather(1, target[:, None]).mean())
                hits += int(torch.stack(means).argmax()) == example.answer
            progress()
    return hits / max(len(examples), 1)


def build(name: str, tokenizer, text: str, n: int, prefix: tuple[int, ...], what: str) -> list[Example]:
    """The examples of task `name` from `text` (exit 2 when the text is too short for any)."""
    examples = BUILDERS[name](tokenizer, text.split(), n, prefix)
    if not examples:
        raise UsageError(f"--tasks {name}: {what} is too short to build any example (each needs "
                         f"{CONTEXT_WORDS + CONTINUATION_WORDS} words); pass a longer text")
    return examples
