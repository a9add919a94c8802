"""io/data.py: loading sources, the held-out split, calibration sampling (char tokenizer, no network)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from subspace_cli.errors import UsageError
from subspace_cli.io import data
from subspace_cli.io.data import (
    eval_windows,
    load_documents,
    load_text,
    resolve_calibration,
    sample_calibration,
    split_holdout,
    split_specs,
    tokenize_text,
)
from tiny_models import TEXT


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)  # one token per character


def numbered(n_lines: int, tag: str = "") -> str:
    # Every line is unique, so a decoded window of > 1 line has exactly one position in the text.
    return "".join(f"{tag}{i:05d} the quick fox\n" for i in range(n_lines))


def decode(tok, ids: torch.Tensor) -> str:
    return tok.decode(ids.tolist())


# ---------------------------------------------------------------------------------- loading


def test_text_file_is_one_document(text_file):
    assert load_documents(str(text_file)) == [TEXT]


def test_directory_txt_files_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "blank.txt").write_text("  \n")  # dropped: no text
    (tmp_path / "notes.md").write_text("not a txt")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    assert load_documents(str(tmp_path)) == ["ay", "bee", "sea"]
    assert load_text(str(tmp_path)) == "ay\n\nbee\n\nsea"


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(path)) == ["one", "two"]


@pytest.mark.parametrize(
    "lines, bad_line",
    [
        ([{"text": "ok"}, {"body": "no text"}], 2),
        ([{"text": "ok"}, {"text": "ok"}, "{not json"], 3),
        (["[1, 2]"], 1),
    ],
)
def test_jsonl_bad_line_names_line_number(tmp_path, lines, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(UsageError, match=rf"line {bad_line} of '.*bad.jsonl'.*\"text\" field"):
        load_documents(str(path))


@pytest.mark.parametrize("content", ["", "   \n\n\t"])
def test_empty_file_is_usage_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UsageError, match=r"--calib '.*empty.txt' is empty"):
        load_documents(str(path))


def test_empty_directory_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is empty"):
        load_documents(str(tmp_path))


def test_missing_path_suggests_builtin():
    with pytest.raises(UsageError, match=r"'shakespeare' does not exist \(did you mean builtin:shakespeare\?\)"):
        load_documents("shakespeare")


def test_unknown_builtin_corpus_lists_valid():
    with pytest.raises(UsageError, match="unknown builtin corpus 'builtin:nope'; valid: builtin:shakespeare, builtin:kjv"):
        load_documents("builtin:nope")


def test_self_is_refused_here():
    with pytest.raises(UsageError, match="'self'"):
        load_documents("self")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_documents(str(path))


def test_split_specs_commas_and_paths(tmp_path):
    odd = tmp_path / "a,b.txt"
    odd.write_text("x")
    assert split_specs("builtin:shakespeare, builtin:kjv,builtin:kjv") == ["builtin:shakespeare", "builtin:kjv"]
    assert split_specs([str(odd), "builtin:kjv"]) == [str(odd), "builtin:kjv"]


# --------------------------------------------------------------------------- split, sample


def test_split_holdout_partitions_by_position():
    text = numbered(1000)
    pool, held = split_holdout(text)
    assert pool + held == text
    assert len(held) == round(0.05 * len(text))
    with pytest.raises(UsageError, match=r"holdout fraction must be in \[0, 1\), got 1.5"):
        split_holdout(text, 1.5)


def test_tokenize_chunks_match_whole_text(tok, monkeypatch):
    text = numbered(300)
    whole = tok(text, add_special_tokens=False).input_ids
    monkeypatch.setattr(data, "_TOKENIZE_CHUNK_CHARS", 100)  # forces ~70 chunks
    assert tokenize_text(tok, text).tolist() == whole


def test_calibration_windows_come_from_pool_only(tok):
    text = numbered(2000)
    pool, held = split_holdout(text)
    ids = sample_calibration(tok, pool, n_samples=32, seqlen=48, seed=0)
    assert ids.shape == (32, 48) and ids.dtype == torch.long
    for row in ids:
        window = decode(tok, row)
        start = text.find(window)
        assert window in pool and start + len(window) <= len(pool)  # never reaches the held-out part
    for row in eval_windows(tok, held, seqlen=48):
        assert text.find(decode(tok, row)) >= len(pool)


def test_sampling_is_deterministic_per_seed(tok):
    pool = numbered(500)
    a = sample_calibration(tok, pool, 8, 32, seed=1)
    b = sample_calibration(tok, pool, 8, 32, seed=1)
    c = sample_calibration(tok, pool, 8, 32, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_too_little_text_names_sizes(tok):
    with pytest.raises(UsageError, match=r"has 10 tokens \(in the 95% used for sampling\), fewer than --calib-seqlen 10 \+ 1"):
        sample_calibration(tok, "0123456789", 4, 10, seed=0)
    sample_calibration(tok, "0123456789X", 4, 10, seed=0)  # exactly seqlen + 1 is enough


def test_eval_windows_shapes(tok):
    text = "abcdefghij" * 100  # 1000 chars = 1000 tokens
    assert eval_windows(tok, text, seqlen=64).shape == (15, 64)  # 1000 // 64, tail dropped
    assert eval_windows(tok, text, seqlen=64, max_chars=300).shape == (4, 64)
    assert eval_windows(tok, text, seqlen=64, max_chars=None).shape == (15, 64)
    assert eval_windows(tok, text[:40], seqlen=64).shape == (1, 40)  # only window: kept ragged
    for short in ("", "a"):  # a window scores its tokens after the first: one token scores nothing
        with pytest.raises(UsageError, match=r"has [01] token\(s\); scoring needs at least 2"):
            eval_windows(tok, short, seqlen=64)


# ------------------------------------------------------------------------------ mixed sources


def test_mixed_sources_split_counts(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(numbered(400, tag="A"))
    b.write_text(numbered(400, tag="B"))
    calib = resolve_calibration([f"{a},{b}"], tok, n_samples=7, seqlen=40, seed=3)
    assert calib.sources == [str(a), str(b)]
    assert calib.counts == {str(a): 4, str(b): 3}  # remainder to the first source
    assert calib.input_ids.shape == (7, 40)
    pool_a, held_a = split_holdout(a.read_text())
    assert calib.heldout[str(a)] == held_a
    assert all(decode(tok, row) in pool_a for row in calib.input_ids[:4])
    assert all("A" not in decode(tok, row) for row in calib.input_ids[4:])
    # One source alone is exactly sample_calibration on its pool with the same seed.
    single = resolve_calibration(str(a), tok, n_samples=5, seqlen=40, seed=3)
    assert torch.equal(single.input_ids, sample_calibration(tok, pool_a, 5, 40, seed=3))


def test_fewer_samples_than_sources(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT)
    with pytest.raises(UsageError, match="--calib-samples 1 is fewer than the 2 --calib sources"):
        resolve_calibration([str(a), str(b)], tok, n_samples=1, seqlen=8, seed=0)



def test_windows_avoiding_share_no_token_with_the_taken_windows(tok):
    ids = torch.arange(5000)  # token i at position i: a window's tokens tell where it came from
    taken = data.window_starts(ids.numel(), 40, 32, seed=0)
    free = data.windows_avoiding(ids, taken, 40, 32, seed=1)
    assert free.shape == (40, 32)
    used = {t for start in taken.tolist() for t in range(start, start + 32)}
    assert not used & set(free.flatten().tolist())
    assert len({int(row[0]) for row in free}) == 40  # distinct windows
    assert torch.equal(free, data.windows_avoiding(ids, taken, 40, 32, seed=1))  # seeded
    # The taken starts are those sample_calibration draws, so its rows are what is avoided.
    text = numbered(300)
    starts = data.window_starts(tokenize_text(tok, text).numel(), 8, 32, seed=3)
    expected = tokenize_text(tok, text)[starts[:, None] + torch.arange(32)]
    assert torch.equal(sample_calibration(tok, text, 8, 32, seed=3), expected)


def test_windows_avoiding_returns_only_what_is_free():
    ids = torch.arange(100)
    # Starts run 0 … 69. A window at 0 blocks starts 0 … 29 and one at 40 blocks 11 … 69: none is free.
    assert data.windows_avoiding(ids, torch.tensor([0, 40]), 10, 30, seed=0).shape == (0, 30)
    few = data.windows_avoiding(ids, torch.tensor([0]), 100, 30, seed=0)  # free starts 30 … 69
    assert few.shape == (40, 30) and int(few[:, 0].min()) == 30
