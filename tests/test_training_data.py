"""io/training_data.py: formats, loss masks, packing, the held-out split, errors (char tokenizer, no model)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.data import split_holdout
from subspace_cli.io.training_data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    TokenBatchSet,
    load_training_data,
)
from tiny_models import TEXT, make_char_tokenizer

BOS, EOS, PAD = 1, 2, 3  # the char tokenizer's special ids
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
BIG = 100_000  # a seqlen no example reaches: nothing is truncated


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def alpaca_records(n: int) -> list[dict]:
    # Every other record has an input; outputs differ in length so padding varies.
    return [
        {"instruction": f"Say {i}.", "input": f"ctx {i}" if i % 2 else "", "output": f"answer {i}" + "!" * (i % 5)}
        for i in range(n)
    ]


def real_rows(data: TokenBatchSet) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of each row without its padding."""
    return [(ids[mask == 1], labels[mask == 1]) for ids, labels, mask in
            zip(data.input_ids, data.labels, data.attention_mask)]


def runs(ids: torch.Tensor, labelled: torch.Tensor) -> list[torch.Tensor]:
    """The maximal runs of consecutive labelled tokens."""
    out, current = [], []
    for token, flag in zip(ids.tolist(), labelled.tolist()):
        if flag:
            current.append(token)
        elif current:
            out, current = out + [torch.tensor(current)], []
    return out + ([torch.tensor(current)] if current else [])


# ---------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "records, expected",
    [
        ([{"text": "hello there"}, {"text": "general kenobi"}], "jsonl"),
        (alpaca_records(4), "alpaca"),
        ([{"instruction": "Do it.", "output": "Done."}, {"instruction": "Again.", "output": "Ok."}], "alpaca"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2, "chat"),
    ],
)
def test_jsonl_format_detected_from_first_record(tmp_path, chat_tok, records, expected):
    data = load_training_data([write_jsonl(tmp_path / "d.jsonl", records)], chat_tok, packing=False)
    assert data.format == expected
    assert data.n_examples == len(records)
    assert len(data.train) + len(data.eval) == len(records)


def test_text_sources_and_several_specs(tmp_path, tok):
    txt = tmp_path / "a.txt"
    txt.write_text(TEXT)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.txt").write_text(TEXT)
    records = write_jsonl(tmp_path / "c.jsonl", alpaca_records(4))
    data = load_training_data([str(txt), f"{tmp_path / 'dir'},{records}"], tok, seqlen=64)
    assert data.format == "text,text,alpaca"


def test_forced_format_text_reads_jsonl_text_field(tmp_path, tok):
    records = [{"text": "abc", "instruction": "i", "output": "x"}, {"text": "def", "instruction": "j", "output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert load_training_data([path], tok, packing=False).format == "alpaca"  # auto: "instruction" wins
    forced = load_training_data([path], tok, packing=False, format="text")
    assert forced.format == "jsonl"
    assert tok.decode(real_rows(forced.train)[0][0].tolist()) == "<s>abc</s>"


# ------------------------------------------------------------------------------- loss masks


def test_text_loss_everywhere_but_padding(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * 5}, {"text": "b" * 9}, {"text": "c"}])
    data = load_training_data([path], tok, packing=False)
    real = data.train.attention_mask == 1
    assert torch.equal(data.train.labels[real], data.train.input_ids[real])
    assert (data.train.labels[~real] == IGNORE_INDEX).all()
    assert tok.decode(real_rows(data.train)[1][0].tolist()) == "<s>bbbbbbbbb</s>"


def test_alpaca_loss_only_on_response_and_eos(tmp_path, tok):
    records = alpaca_records(10)
    data = load_training_data([write_jsonl(tmp_path / "a.jsonl", records)], tok, packing=False, eval_fraction=0.2)
    rows = real_rows(data.train) + real_rows(data.eval)
    assert len(rows) == len(records)  # 8 train + 2 eval, in file order
    for record, (ids, labels) in zip(records, rows):
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        assert tok.decode(ids[labelled].tolist()) == record["output"] + "</s>"
        template = ALPACA_PROMPT if record["input"] else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=record["input"])
        assert tok.decode(ids[~labelled].tolist()) == "<s>" + prompt
        assert labelled.nonzero().squeeze(1).tolist() == list(range(len(prompt) + 1, len(ids)))  # the tail only


def test_alpaca_prompt_is_the_standard_template():
    assert ALPACA_PROMPT.format(instruction="I", input="X") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nX\n\n"
        "### Response:\n"
    )
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="I") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nI\n\n### Response:\n"
    )


def test_chat_loss_exactly_on_assistant_turns(tmp_path, chat_tok):
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}, {"messages": conversation[:3]}])
    data = load_training_data([path], chat_tok, packing=False)
    (ids, labels), = real_rows(data.train)
    rendered = "<system>be brief</s><user>hi</s><assistant>yo</s><user>and?</s><assistant>fine thanks</s>"
    assert chat_tok.decode(ids.tolist()) == "<s>" + rendered  # bos added: the template writes none
    labelled = labels != IGNORE_INDEX
    assert torch.equal(labels[labelled], ids[labelled])
    # Each assistant turn's content and its end-of-turn marker, nothing else.
    assert [chat_tok.decode(run.tolist()) for run in runs(ids, labelled)] == ["yo</s>", "fine thanks</s>"]
    (eval_ids, eval_labels), = real_rows(data.eval)
    assert [chat_tok.decode(r.tolist()) for r in runs(eval_ids, eval_labels != IGNORE_INDEX)] == ["yo</s>"]


def test_chat_template_writing_bos_gets_no_second_bos(tmp_path):
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}] * 2)
    (ids, _), = real_rows(load_training_data([path], tokenizer, packing=False).train)
    assert ids[:2].tolist() == [BOS, tokenizer.convert_tokens_to_ids("<")]


# ------------------------------------------------------------------------------ packing


def test_packing_is_the_stream_of_examples_cut_into_windows(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(30))
    seqlen = 64
    unpacked = load_training_data([path], tok, packing=False, seqlen=BIG)
    packed = load_training_data([path], tok, packing=True, seqlen=seqlen)
    assert packed.n_examples == unpacked.n_examples == 30
    for name in ("train", "eval"):
        rows = real_rows(getattr(unpacked, name))
        stream_ids = torch.cat([ids for ids, _ in rows])  # every example, bos ... eos, in order
        stream_labels = torch.cat([labels for _, labels in rows])
        data = getattr(packed, name)
        n_rows = stream_ids.numel() // seqlen
        keep = n_rows * seqlen
        assert data.input_ids.shape == data.labels.shape == (n_rows, seqlen)
        assert (data.attention_mask == 1).all() and not (data.input_ids == PAD).any()
        assert torch.equal(data.input_ids.flatten(), stream_ids[:keep])
        assert torch.equal(data.labels.flatten(), stream_labels[:keep])
        # Label tokens are kept but for the dropped remainder ...
        dropped = int((stream_labels[keep:] != IGNORE_INDEX).sum())
        assert int((data.labels != IGNORE_INDEX).sum()) == int((stream_labels != IGNORE_INDEX).sum()) - dropped
        # ... and n_label_tokens further leaves out each row's first label (nothing predicts it).
        first = int((data.labels[:, 0] != IGNORE_INDEX).sum())
        assert data.n_label_tokens == int((stream_labels != IGNORE_INDEX).sum()) - dropped - first


def test_packing_too_little_falls_back_to_one_padded_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": "de"}])
    data = load_training_data([path], tok, seqlen=16)
    assert data.train.input_ids.tolist() == [[BOS, *tok("abc", add_special_tokens=False).input_ids, EOS] + [PAD] * 11]
    assert data.train.attention_mask.tolist() == [[1] * 5 + [0] * 11]
    assert data.train.labels[0, 5:].eq(IGNORE_INDEX).all()
    assert data.notes == ["train: 5 tokens are fewer than one --seqlen 16 window; using one padded row",
                          "eval: 4 tokens are fewer than one --seqlen 16 window; using one padded row"]


def test_no_packing_pads_right_with_ignore_and_zero_mask(tmp_path, tok):
    records = alpaca_records(12)
    data = load_training_data([write_jsonl(tmp_path / "a.jsonl", records)], tok, packing=False, eval_fraction=0.25)
    lengths = data.train.attention_mask.sum(1)
    assert len(data.train) == 9 and data.train.input_ids.shape[1] == int(lengths.max())  # padded to the longest
    for ids, labels, mask, n in zip(data.train.input_ids, data.train.labels, data.train.attention_mask, lengths):
        assert mask.tolist() == [1] * n + [0] * (len(mask) - n)
        assert (ids[n:] == PAD).all() and (labels[n:] == IGNORE_INDEX).all()
        assert ids[n - 1] == EOS and labels[n - 1] == EOS


def test_no_packing_truncates_records_and_says_so(tmp_path, tok):
    records = [{"instruction": "x", "output": "y" * n} for n in (1, 50, 2, 80)]  # the last one is eval
    path = write_jsonl(tmp_path / "a.jsonl", records)
    prompt = len(ALPACA_PROMPT_NO_INPUT.format(instruction="x")) + 1  # with bos
    seqlen = prompt + 20
    data = load_training_data([path], tok, packing=False, seqlen=seqlen)
    assert data.train.input_ids.shape == (3, seqlen)
    assert data.train.attention_mask.sum(1).tolist() == [prompt + 2, seqlen, prompt + 3]  # + output + eos
    assert data.notes == [f"train: 1 of 3 examples were longer than --seqlen {seqlen} and truncated",
                          f"eval: 1 of 1 examples were longer than --seqlen {seqlen} and truncated"]
    short = load_training_data([path], tok, packing=False, seqlen=prompt)  # no room for any response
    assert short.notes[0] == (f"train: 3 of 3 examples were longer than --seqlen {prompt} and truncated; "
                              "3 of them lost every token that carries loss")
    assert short.train.n_label_tokens == 0


# ------------------------------------------------------------------------------ held out


def test_plain_text_split_is_split_holdout(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    pool, held = split_holdout(TEXT)
    seqlen = 64
    data = load_training_data([str(path)], tok, packing=False, seqlen=seqlen)
    for split, text in ((data.train, pool), (data.eval, held)):
        rows = real_rows(split)
        assert all(ids.numel() == seqlen for ids, _ in rows[:-1])  # cut into chunks, not truncated
        assert tok.decode(torch.cat([ids for ids, _ in rows]).tolist()) == "<s>" + text + "</s>"
        assert all(torch.equal(ids, labels) for ids, labels in rows)
    assert data.n_examples == math.ceil((len(pool) + 2) / seqlen) + math.ceil((len(held) + 2) / seqlen)
    assert data.format == "text"


def test_eval_rows_are_the_tail_records(tmp_path, tok):
    records = [{"text": f"record {i:02d}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = load_training_data([path], tok, packing=False, eval_fraction=0.1)
    decoded = lambda split: [tok.decode(ids.tolist()) for ids, _ in real_rows(split)]  # noqa: E731
    assert decoded(data.train) == [f"<s>record {i:02d}</s>" for i in range(36)]
    assert decoded(data.eval) == [f"<s>record {i:02d}</s>" for i in range(36, 40)]
    packed = load_training_data([path], tok, seqlen=8, eval_fraction=0.1)
    eval_text = tok.decode(packed.eval.input_ids.flatten().tolist())
    assert eval_text == "".join(f"<s>record {i:02d}</s>" for i in range(36, 40))[: len(eval_text)]
    # Each file holds out its own tail: max(1, round(0.05 * 3)) = 1 record of three.
    few = load_training_data([write_jsonl(tmp_path / "e.jsonl", records[:3]), path], tok, packing=False)
    assert decoded(few.eval) == ["<s>record 02</s>", "<s>record 38</s>", "<s>record 39</s>"]


def test_max_train_and_max_eval_keep_the_first_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(40))
    full = load_training_data([path], tok, seqlen=32, eval_fraction=0.25)
    cut = load_training_data([path], tok, seqlen=32, eval_fraction=0.25, max_train=3, max_eval=2)
    assert torch.equal(cut.train.input_ids, full.train.input_ids[:3])
    assert torch.equal(cut.eval.labels, full.eval.labels[:2])
    assert cut.n_examples == full.n_examples == 40


@pytest.mark.builtin
@pytest.mark.slow
def test_builtin_kjv(tok):
    data = load_training_data(["builtin:kjv"], tok, seqlen=128, max_train=16, max_eval=4)
    assert data.format == "text" and data.n_examples > 30_000
    assert data.train.input_ids.shape == (16, 128) and data.eval.input_ids.shape == (4, 128)
    assert data.train.n_label_tokens == 16 * 127


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "lines, fmt, message",
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], "auto", r"{path}:2: not valid JSON \(.*\)"),
        (['{"text": "a"}', "[1, 2]"], "auto", r"{path}:2: a JSON list, not an object"),
        (['{"instruction": "a", "output": "b"}', "", '{"instruction": "c", "input": "d"}'], "auto",
         r"{path}:3: missing field\(s\) 'output' needed by the alpaca format; found fields: 'instruction', 'input'"),
        (['{"text": "a"}', '{"text": "b"}'], "alpaca",
         r"{path}:1: missing field\(s\) 'instruction', 'output' needed by the alpaca format; found fields: 'text'"),
        (['{"instruction": "a", "output": 7}'], "auto", r"{path}:1: field 'output' must be a string, got int"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}'], "auto",
         r"{path}:1: messages\[1\]: missing field\(s\) 'content' needed by the chat format; found fields: 'role'"),
        (['{"messages": [{"role": "assistant", "content": "a"}]}'], "auto",
         r"{path}:1: the conversation starts with an assistant message"),
        (['{"output": "a"}', '{"output": "b"}'], "auto",
         r"{path}:1: missing field\(s\) 'instruction' needed by the alpaca format; found fields: 'output'"),
        (['{"prompt": "a", "completion": "b"}'], "auto",
         r"cannot tell the format of '{path}' from {path}:1: its fields are 'prompt', 'completion'"),
        ([], "auto", r"training data '{path}' has no training examples: it holds no records"),
        (['{"text": "  "}', '{"text": ""}'], "auto",
         r"training data '{path}' has no training examples: all 2 records are empty \(no text\)"),
        (['{"instruction": "a", "output": ""}'] * 3, "auto",
         r"training data '{path}' has no training examples: all 3 records are empty \(no response\)"),
        (['{"text": "only"}', '{"text": ""}'], "auto",
         r"training data '{path}' has only 1 non-empty record; at least 2 are needed to hold one out for evaluation"),
    ],
)
def test_bad_jsonl_is_usage_error(tmp_path, chat_tok, lines, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UsageError, match=message.format(path=re.escape(path))):
        load_training_data([path], chat_tok, format=fmt)


def test_chat_without_template_names_file_and_alternative(tmp_path, tok):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    with pytest.raises(UsageError, match=rf"'{re.escape(path)}' holds chat records, which need a tokenizer with a chat "
                                         r"template.*'text' field and pass --format jsonl"):
        load_training_data([path], tok)


def test_plain_text_errors(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(UsageError, match=rf"--data '{re.escape(str(empty))}' is empty"):
        load_training_data([str(empty)], tok)
    with pytest.raises(UsageError, match=r"'missing.jsonl' does not exist"):
        load_training_data(["missing.jsonl"], tok, format="alpaca")  # load_source's error
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(UsageError, match=rf"--format chat reads .jsonl records, but '{re.escape(str(text))}' is not a .jsonl file"):
        load_training_data([str(text)], tok, format="chat")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seqlen": 1}, r"--seqlen must be at least 2"),
        ({"eval_fraction": 0.0}, r"eval fraction must be in \(0, 1\), got 0.0"),
        ({"format": "csv"}, r"unknown --format 'csv'; valid: auto, text, jsonl, alpaca, chat"),
        ({"max_train": 0}, r"max_train must be a positive number of rows, got 0"),
    ],
)
def test_bad_arguments(tmp_path, tok, kwargs, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(UsageError, match=message):
        load_training_data([path], tok, **kwargs)
    with pytest.raises(UsageError, match="no training data given"):
        load_training_data([], tok)


@pytest.mark.parametrize(
    "template, message",
    [
        # Renders the last message differently: earlier turns are not prefixes of the whole.
        ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}<{{ m['role'] }}>"
         "{{ m['content'] }}</s>{% endif %}{% endfor %}",
         r"{path}:1: the tokenizer's chat template renders earlier turns differently.*--format jsonl"),
        ("{{ raise_exception('roles must alternate') }}",
         r"{path}:1: the tokenizer's chat template cannot render this conversation: roles must alternate"),
    ],
)
def test_chat_template_that_cannot_be_split(tmp_path, template, message):
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = template
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    with pytest.raises(UsageError, match=message.format(path=re.escape(path))):
        load_training_data([path], tokenizer)


def test_non_utf8_jsonl(tmp_path, tok):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\r\n{"text": "caf\xe9"}\n')  # a BOM and CRLF are fine
    with pytest.raises(UsageError, match=rf"{re.escape(str(path))}:2: not UTF-8 text \(byte 13 of the line\)"):
        load_training_data([str(path)], tok)
