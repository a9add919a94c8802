"""Training data for `subspace adapt`: sources and a tokenizer in, token rows out (no model).

A source spec (several are concatenated, each split into train and eval on its own) is
  plain text   a text file, a directory of .txt files, builtin:shakespeare or builtin:kjv, loaded
               as io/data.py loads it (documents joined into one text). Format "text": the loss
               is on every token. The last `eval_fraction` of the characters is held out with
               `split_holdout`, as compress does, so no eval character was ever trained on.
  PATH.jsonl   one record per line, the format detected from the first record's keys (or forced
               with `format`):
                 "text"                              -> "jsonl": like plain text, one document each
                 "instruction" (+ "input"), "output" -> "alpaca": loss on the response + eos only
                 "messages" [{role, content}, ...]   -> "chat": the tokenizer's chat template,
                                                        loss on the assistant turns only
               The last max(1, round(eval_fraction * n)) records are held out.

Every example becomes `bos? + tokens + eos?` with labels -100 where no loss is taken. Then either
packing (each split's examples concatenated into one stream, cut into full `seqlen` windows) or
one right-padded row per example (plain-text documents cut into seqlen chunks, records truncated).
Where the tokenizer opens every text with a BOS (Llama, Mistral, Gemma: `io.data.special_tokens`),
every row opens with exactly one: a window or chunk that starts inside an example gets the BOS
and seqlen − 1 tokens, as the model saw text in pretraining. Rows are not shuffled here: the
trainer shuffles with its own seeded generator.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.data import (HOLDOUT_FRACTION, load_source, special_tokens, split_holdout, split_specs,
                                  text_length, tokenize_text)

logger = logging.getLogger(__name__)

Format = Literal["auto", "text", "jsonl", "alpaca", "chat"]
FORMATS = ("auto", "text", "jsonl", "alpaca", "chat")
IGNORE_INDEX = -100  # label of a token that carries no loss (cross_entropy's ignore_index)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_ENCODE_BATCH = 1024  # records tokenized per call (bounds the memory of one batch)
_LONG_TEXT_CHARS = 1 << 16  # longer texts go through tokenize_text, which chunks them
_FORMAT_HELP = "'text' (jsonl), 'instruction' + 'output' (alpaca) or 'messages' (chat)"


# ---------------------------------------------------------------------------------- results


@dataclass
class TokenBatchSet:
    """Rows for a causal LM: the model shifts labels itself (token t predicts label t + 1)."""

    input_ids: torch.Tensor  # [N, L] long
    labels: torch.Tensor  # [N, L] long, IGNORE_INDEX where no loss (padding, prompts)
    attention_mask: torch.Tensor  # [N, L] long, 1 real token, 0 padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_label_tokens(self) -> int:
        """Tokens that carry loss after the causal shift (a row's first label is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def head(self, n: int | None) -> TokenBatchSet:
        """The first `n` rows (all if n is None)."""
        if n is None:
            return self
        return TokenBatchSet(self.input_ids[:n], self.labels[:n], self.attention_mask[:n])


@dataclass
class TrainingData:
    train: TokenBatchSet
    eval: TokenBatchSet
    format: str  # the format of each source, comma-joined ("alpaca", "text,chat")
    n_examples: int  # records (plain text: seqlen chunks) before packing, train + eval
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------- examples

Segment = tuple[str, bool]  # (text, carries loss)


@dataclass
class _Example:
    """One document or record as text segments, before tokenizing."""

    segments: list[Segment]
    cut: bool  # without packing: cut into seqlen chunks (loss everywhere) rather than truncated
    document: bool = False  # a plain-text split: counted in seqlen chunks in n_examples


@dataclass
class _Tokens:
    ids: torch.Tensor  # [n] long
    labels: torch.Tensor  # [n] long
    cut: bool
    document: bool


@dataclass
class _Source:
    format: str
    train: list[_Example]
    eval: list[_Example]


# ----------------------------------------------------------------------------- plain text


def _read_text_source(spec: str, eval_fraction: float, notes: list[str]) -> _Source:
    """A plain-text source as one document per split: its pool and its held-out tail."""
    source = load_source(spec, "--data")  # its UsageErrors name a missing, empty or non-UTF-8 source
    pool, held = split_holdout(source.text, eval_fraction)
    if not held.strip():
        notes.append(f"'{spec}' is too short to hold out any text for evaluation")
    return _Source(
        "text",
        [_Example([(pool, True)], cut=True, document=True)] if pool.strip() else [],
        [_Example([(held, True)], cut=True, document=True)] if held.strip() else [],
    )


# ---------------------------------------------------------------------------------- records


def _read_records(path: Path, spec: str) -> list[tuple[int, dict]]:
    """(1-based line number, record) of every non-blank line."""
    records = []
    with open(path, "rb") as handle:  # decoded per line, so an encoding error has a line number
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{spec}:{lineno}: not UTF-8 text (byte {exc.start} of the line); "
                                 "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{spec}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise UsageError(f"{spec}:{lineno}: a JSON {type(record).__name__}, not an object; "
                                 f"each line must be one JSON object with {_FORMAT_HELP} fields")
            records.append((lineno, record))
    return records


def _detect_format(record: dict, spec: str, lineno: int) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "jsonl"
    if "output" in record:
        return "alpaca"  # its missing "instruction" is then named
    raise UsageError(f"cannot tell the format of '{spec}' from {spec}:{lineno}: its fields are {_fields(record)}; "
                     f"records need {_FORMAT_HELP}")


def _fields(record: dict) -> str:
    return ", ".join(repr(k) for k in record) or "none"


def _require(record: dict, names: tuple[str, ...], where: str, fmt: str, strings: bool = True) -> None:
    """UsageError naming the missing fields (and those found), or a field that is not a string."""
    missing = [n for n in names if n not in record]
    if missing:
        raise UsageError(f"{where}: missing field(s) {', '.join(repr(n) for n in missing)} needed by the {fmt} format; "
                         f"found fields: {_fields(record)}")
    for name in names if strings else ():
        if not isinstance(record[name], str):
            raise UsageError(f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}")


def _text_example(record: dict, where: str) -> _Example:
    _require(record, ("text",), where, "jsonl")
    return _Example([(record["text"], True)], cut=True)


def _alpaca_example(record: dict, where: str) -> _Example:
    _require(record, ("instruction", "output"), where, "alpaca")
    extra = record.get("input") or ""  # optional; null or "" means no input
    if not isinstance(extra, str):
        raise UsageError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    if extra.strip():
        prompt = ALPACA_PROMPT.format(instruction=record["instruction"], input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
    return _Example([(prompt, False), (record["output"], True)], cut=False)  # eos is appended when tokenized


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template's raise_exception (e.g. roles must alternate) or a Jinja error
        raise UsageError(f"{where}: the tokenizer's chat template cannot render this conversation: {exc}") from None


def _chat_example(tokenizer, record: dict, where: str) -> _Example:
    """Segments of the rendered conversation; assistant turns carry the loss.

    An assistant turn i spans from the end of render(messages[:i], generation prompt) to the end
    of render(messages[:i + 1]) (its content and end-of-turn marker), both prefixes of the whole.
    """
    _require(record, ("messages",), where, "chat", strings=False)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UsageError(f"{where}: messages[{j}] must be a {{role, content}} object, got {type(message).__name__}")
        _require(message, ("role", "content"), f"{where}: messages[{j}]", "chat")
    if messages[0]["role"] == "assistant":
        raise UsageError(f"{where}: the conversation starts with an assistant message, which leaves no prompt to "
                         "render before it; start with a system or user message")
    whole = _render(tokenizer, messages, False, where)
    segments: list[Segment] = []
    done = 0  # characters of `whole` already in segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, where)
        turn = _render(tokenizer, messages[: i + 1], False, where)
        if not (turn.startswith(prompt) and whole.startswith(turn) and len(prompt) >= done):
            raise UsageError(f"{where}: the tokenizer's chat template renders earlier turns differently once later "
                             "ones follow, so the assistant turns cannot be located; render the conversations into "
                             "a 'text' field and pass --format jsonl")
        segments += [(whole[done : len(prompt)], False), (whole[len(prompt) : len(turn)], True)]
        done = len(turn)
    segments.append((whole[done:], False))
    return _Example([s for s in segments if s[0]], cut=False)


def _is_empty(record: dict, fmt: str) -> bool:
    """No text to learn from: a blank text, a blank alpaca output, no assistant content."""
    if fmt == "chat":
        return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")
    return not record["text" if fmt == "jsonl" else "output"].strip()


def _read_jsonl_source(spec: str, tokenizer, fmt: str, eval_fraction: float, notes: list[str]) -> _Source:
    records = _read_records(Path(spec).expanduser(), spec)
    if not records:
        raise UsageError(f"training data '{spec}' has no training examples: it holds no records")
    if fmt == "auto":
        fmt = _detect_format(records[0][1], spec, records[0][0])
    elif fmt == "text":
        fmt = "jsonl"  # forcing "text" on a .jsonl file means its "text" field
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"'{spec}' holds chat records, which need a tokenizer with a chat template, and this "
                         "tokenizer has none; render the conversations into a 'text' field and pass --format jsonl")
    build = {"jsonl": _text_example, "alpaca": _alpaca_example,
             "chat": lambda record, where: _chat_example(tokenizer, record, where)}[fmt]
    examples = [build(record, f"{spec}:{lineno}") for lineno, record in records]  # validates every record
    kept = [e for e, (_, record) in zip(examples, records) if not _is_empty(record, fmt)]
    if not kept:
        raise UsageError(f"training data '{spec}' has no training examples: all {len(examples)} records are empty "
                         f"(no {'text' if fmt == 'jsonl' else 'response' if fmt == 'alpaca' else 'assistant content'})")
    if len(kept) < len(examples):
        notes.append(f"'{spec}': skipped {len(examples) - len(kept)} empty record(s)")
    if len(kept) < 2:
        raise UsageError(f"training data '{spec}' has only 1 non-empty record; at least 2 are needed to hold one "
                         "out for evaluation")
    n_eval = min(len(kept) - 1, max(1, round(eval_fraction * len(kept))))  # the tail, deterministic
    return _Source(fmt, kept[:-n_eval], kept[-n_eval:])


def _read_source(spec: str, tokenizer, fmt: str, eval_fraction: float, notes: list[str]) -> _Source:
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return _read_jsonl_source(spec, tokenizer, fmt, eval_fraction, notes)
    if fmt not in ("auto", "text") and (path.exists() or spec.startswith("builtin:")):
        raise UsageError(f"--format {fmt} reads .jsonl records, but '{spec}' is not a .jsonl file; "
                         "use --format auto (or text) for plain text")
    return _read_text_source(spec, eval_fraction, notes)  # load_source raises for a missing path


# ------------------------------------------------------------------------------ tokenizing


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; long ones via tokenize_text's chunking."""
    out: list[list[int]] = [[] for _ in texts]
    short = [i for i, t in enumerate(texts) if t and len(t) <= _LONG_TEXT_CHARS]
    for start in range(0, len(short), _ENCODE_BATCH):
        batch = short[start : start + _ENCODE_BATCH]
        encoded = tokenizer([texts[i] for i in batch], add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
        for i, ids in zip(batch, encoded):
            out[i] = list(ids)
    for i, text in enumerate(texts):
        if len(text) > _LONG_TEXT_CHARS:
            out[i] = tokenize_text(tokenizer, text).tolist()
    return out


def _tokenize(tokenizer, examples: list[_Example], prefix: tuple[int, ...] = ()) -> list[_Tokens]:
    """Each example as `bos? + segments + eos?` with its labels.

    Segments are tokenized separately, so every token belongs to exactly one segment. The bos is
    `prefix`, what the tokenizer puts before a text, where it puts one; else the tokenizer's bos
    token if it has one (a document separator for GPT-2 and SmolLM2, kept so their rows stay as
    they were). It is prepended unless the tokens already start with it (a chat template that
    writes the bos itself). The eos is appended if the tokenizer has one and the tokens do not
    already end with it. Each carries loss iff the segment next to it does: text and alpaca learn
    to end with eos, a chat's separator eos after the template's tail does not.
    """
    encoded = iter(_encode_texts(tokenizer, [text for e in examples for text, _ in e.segments]))
    eos = tokenizer.eos_token_id
    bos = list(prefix) or ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    out = []
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        for _, loss in example.segments:
            piece = next(encoded)
            ids += piece
            labels += piece if loss else [IGNORE_INDEX] * len(piece)
        first_loss, last_loss = example.segments[0][1], example.segments[-1][1]
        if bos and ids[: len(bos)] != bos:
            ids, labels = bos + ids, (bos if first_loss else [IGNORE_INDEX] * len(bos)) + labels
        if eos is not None and ids[-1:] != [eos]:
            ids, labels = ids + [eos], labels + [eos if last_loss else IGNORE_INDEX]
        out.append(_Tokens(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                           example.cut, example.document))
    return out


# ------------------------------------------------------------------------------------- rows


def _padded(rows: list[tuple[torch.Tensor, torch.Tensor]], length: int, pad_id: int) -> TokenBatchSet:
    """Right-pad each (ids [n], labels [n]) row to `length`: [N, length], labels -100 and mask 0 on padding."""
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : ids.numel()] = ids
        labels[r, : ids.numel()] = lab
        mask[r, : ids.numel()] = 1
    return TokenBatchSet(input_ids, labels, mask)


def _cut(ids: torch.Tensor, labels: torch.Tensor, seqlen: int, prefix: tuple[int, ...]
         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) [n] cut into consecutive rows of ≤ seqlen tokens, each opening with `prefix`.

    A row that starts where the stream already holds the prefix (an example's own bos) takes
    seqlen tokens; any other takes the prefix (labels -100) and seqlen − p tokens. Every token is in
    exactly one row and no row opens with the prefix twice. No prefix: plain seqlen chunks.
    """
    if not prefix:
        return list(zip(ids.split(seqlen), labels.split(seqlen)))
    head = torch.tensor(prefix, dtype=ids.dtype)  # [p]
    no_loss = torch.full((len(prefix),), IGNORE_INDEX, dtype=labels.dtype)
    rows, start = [], 0
    while start < ids.numel():
        if torch.equal(ids[start : start + len(prefix)], head):
            end = start + seqlen
            rows.append((ids[start:end], labels[start:end]))
        else:
            end = start + seqlen - len(prefix)
            rows.append((torch.cat([head, ids[start:end]]), torch.cat([no_loss, labels[start:end]])))
        start = end
    return rows


def _pack(tokens: list[_Tokens], seqlen: int, pad_id: int, split: str, notes: list[str],
          prefix: tuple[int, ...] = ()) -> TokenBatchSet:
    """One stream of every example, cut into full [N, seqlen] windows; the ragged tail is dropped."""
    ids = torch.cat([t.ids for t in tokens])  # [n_tokens]
    labels = torch.cat([t.labels for t in tokens])
    if ids.numel() < seqlen:
        notes.append(f"{split}: {ids.numel()} tokens are fewer than one --seqlen {seqlen} window; using one padded row")
        return _padded([(ids, labels)], seqlen, pad_id)
    if not prefix:  # the stream viewed as rows: no copy
        n_rows = ids.numel() // seqlen
        keep = n_rows * seqlen
        return TokenBatchSet(ids[:keep].view(n_rows, seqlen), labels[:keep].view(n_rows, seqlen),
                             torch.ones((n_rows, seqlen), dtype=torch.long))
    rows = [row for row in _cut(ids, labels, seqlen, prefix) if row[0].numel() == seqlen]  # [seqlen] each
    return TokenBatchSet(torch.stack([r for r, _ in rows]), torch.stack([lab for _, lab in rows]),
                         torch.ones((len(rows), seqlen), dtype=torch.long))


def _unpacked(tokens: list[_Tokens], seqlen: int, pad_id: int, split: str, notes: list[str],
              prefix: tuple[int, ...] = ()) -> TokenBatchSet:
    """One row per example, padded to the longest row: plain text cut into seqlen chunks, records truncated."""
    rows, truncated, lost = [], 0, 0
    for t in tokens:
        if t.cut:
            rows += _cut(t.ids, t.labels, seqlen, prefix)
            continue
        if t.ids.numel() > seqlen:
            truncated += 1
            lost += int((t.labels[1:seqlen] != IGNORE_INDEX).sum() == 0)
        rows.append((t.ids[:seqlen], t.labels[:seqlen]))
    if truncated:
        notes.append(f"{split}: {truncated} of {len(tokens)} examples were longer than --seqlen {seqlen} and truncated"
                     + (f"; {lost} of them lost every token that carries loss" if lost else ""))
    return _padded(rows, max(ids.numel() for ids, _ in rows), pad_id)


def _count_examples(tokens: list[_Tokens], seqlen: int, prefix: tuple[int, ...] = ()) -> int:
    """Records, a plain-text split counted in the chunks `_cut` makes of it: its first of seqlen
    tokens (it opens with its own bos), the others of seqlen − p."""
    def chunks(n: int) -> int:
        return 1 + math.ceil(max(n - seqlen, 0) / (seqlen - len(prefix)))

    return sum(chunks(t.ids.numel()) if t.document else 1 for t in tokens)


# ---------------------------------------------------------------------------------- loading


def _check_arguments(specs, seqlen, format, eval_fraction, max_train, max_eval) -> None:
    if not specs:
        raise UsageError("no training data given; pass --data (a text file, a directory of .txt files, a .jsonl file, "
                         "builtin:shakespeare or builtin:kjv)")
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}; valid: {', '.join(FORMATS)}")
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2 (one token predicting the next), got {seqlen}")
    if not 0.0 < eval_fraction < 1.0:
        raise UsageError(f"the eval fraction must be in (0, 1), got {eval_fraction}")
    for flag, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of rows, got {value}")


def load_training_data(
    specs: list[str],
    tokenizer,
    *,
    seqlen: int = 256,
    packing: bool = True,
    format: Format = "auto",
    eval_fraction: float = HOLDOUT_FRACTION,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TrainingData:
    """Train and eval rows from the sources `specs` (several concatenated in order).

    `format` forces how .jsonl files are read ("auto": from each file's first record). Nothing
    here is random: the split and the rows are a function of the data, so `seed` only marks the
    run (the trainer shuffles rows with its own seeded generator). `max_train` / `max_eval` keep
    the first rows of each set.
    """
    del seed  # deterministic by design; kept so callers pass one run-wide seed everywhere
    _check_arguments(specs, seqlen, format, eval_fraction, max_train, max_eval)
    prefix = special_tokens(tokenizer).prefix  # () unless the tokenizer opens every text with a bos
    text_length(seqlen, prefix, "--seqlen")
    notes: list[str] = []
    sources = {spec: _read_source(spec, tokenizer, format, eval_fraction, notes) for spec in split_specs(specs, "--data")}
    train = _tokenize(tokenizer, [e for s in sources.values() for e in s.train], prefix)
    held = _tokenize(tokenizer, [e for s in sources.values() for e in s.eval], prefix)
    if not train or not held:
        raise UsageError(f"no {'training' if not train else 'held-out evaluation'} examples in "
                         f"{', '.join(sources)}; give more data or another eval fraction")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)  # masked anyway
    build = _pack if packing else _unpacked
    data = TrainingData(
        train=build(train, seqlen, pad_id, "train", notes, prefix).head(max_train),
        eval=build(held, seqlen, pad_id, "eval", notes, prefix).head(max_eval),
        format=",".join(s.format for s in sources.values()),
        n_examples=_count_examples(train, seqlen, prefix) + _count_examples(held, seqlen, prefix),
        notes=notes,
    )
    logger.info("training data (%s): %d examples -> %d train rows (%d label tokens), %d eval rows",
                data.format, data.n_examples, len(data.train), data.train.n_label_tokens, len(data.eval))
    return data
