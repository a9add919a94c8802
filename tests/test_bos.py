"""Special tokens as the tokenizer adds them (issue 16): with a tokenizer that opens every text with a
BOS (Llama, Mistral, Gemma), every verb's calibration rows, evaluation windows, membership windows and
training rows open with exactly one BOS; with one that adds nothing (GPT-2, SmolLM2, Qwen) every id
is what it was before this change (fingerprints recorded from the code before it)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from subspace_cli.io import data
from subspace_cli.io.training_data import IGNORE_INDEX, load_training_data
from tiny_models import TEXT, VOCAB, make_char_tokenizer, make_tiny_llama, perturbed_copy, use_bos_tokenizer

BOS, EOS = 1, 2  # the char tokenizer's <s>, </s>
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
RETAIN_TEXT = "In the beginning God created the heaven and the earth.\nAnd the earth was without form.\n" * 60


@pytest.fixture(scope="module")
def bos_tok():
    tokenizer = make_char_tokenizer(bos=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "bos-llama", bos=True)


def _invoke(*args):
    from subspace_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _inputs(root: Path) -> Path:
    """A plain text, 12 alpaca records and 12 chat records under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "t.txt").write_text(TEXT)
    alpaca = [{"instruction": f"Say {i}.", "input": f"ctx {i}" if i % 2 else "", "output": f"answer {i}" + "!" * (i % 5)}
              for i in range(12)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"yo {i}" * (1 + i % 3)}]} for i in range(12)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    return root


def _starts_with_one_bos(rows: torch.Tensor) -> bool:
    """Every row [n, L] opens with BOS, and only one (L ≥ 2)."""
    return bool((rows[:, 0] == BOS).all() and (rows[:, 1] != BOS).all())


# ------------------------------------------------------------------------- detection


def test_special_tokens_are_what_the_tokenizer_adds():
    assert data.special_tokens(make_char_tokenizer()) == data.SpecialTokens((), ())
    assert data.special_tokens(make_char_tokenizer(bos=True)) == data.SpecialTokens((BOS,), ())
    # The tokenizer's bos_token alone says nothing: this one declares <s> and never adds it.
    assert make_char_tokenizer().bos_token_id == BOS


def test_a_suffix_is_detected_but_never_put_at_a_window_end(tmp_path):
    from tokenizers import processors

    tokenizer = make_char_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)])
    assert data.special_tokens(tokenizer) == data.SpecialTokens((BOS,), (EOS,))
    rows = data.sample_calibration(tokenizer, TEXT, 6, 16, seed=0)
    windows = data.eval_windows(tokenizer, TEXT, 16)
    for batch in (rows, windows):
        assert _starts_with_one_bos(batch) and not (batch == EOS).any()  # the text goes on past the window
    # A training example's true end gets one EOS, not the tokenizer's and ours.
    (root := tmp_path / "in").mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    train = load_training_data([str(root / "a.jsonl")], tokenizer, seqlen=64, packing=False).train
    for ids, mask in zip(train.input_ids, train.attention_mask):
        real = ids[mask == 1]
        assert real[0] == BOS and real[-1] == EOS and (real == EOS).sum() == 1 and (real == BOS).sum() == 1


# ------------------------------------------------------------------- ids unchanged


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprints(tokenizer, root: Path) -> dict[str, str]:
    """Every kind of row the verbs build, fingerprinted (calibration, evaluation, membership, training)."""
    root = _inputs(root)
    out = {"calib": _digest(data.sample_calibration(tokenizer, TEXT, 8, 32, seed=3)),
           "eval": _digest(data.eval_windows(tokenizer, TEXT, 32)),
           "eval_short": _digest(data.eval_windows(tokenizer, TEXT[:20], 32)),
           "nonmembers": _digest(data.nonmember_windows(tokenizer, TEXT, 8, 32, member_seed=3, seed=5))}
    for name in ("t.txt", "a.jsonl", "c.jsonl"):
        for packing in (True, False):
            d = load_training_data([str(root / name)], tokenizer, seqlen=32, packing=packing)
            out[f"{name}:{packing}"] = _digest(d.train.input_ids, d.train.labels, d.train.attention_mask, d.eval.input_ids,
                                               d.eval.labels, d.eval.attention_mask) + f":{d.n_examples}"
    return out


# Recorded by `_fingerprints` with the code before this change (its non-members then cut by
# window_starts + windows_avoiding, as pipelines/unlearn.py did): the ids of a tokenizer that adds nothing.
BEFORE_CHAR = {
    "calib": "9a6cba95de38a99c", "eval": "3189fb7dc8c3984f", "eval_short": "c4a5efedae4536fa",
    "nonmembers": "a83a0f0e8961e9ca",
    "t.txt:True": "9127d3d3d6a2f84f:271", "t.txt:False": "1003f24c59c4404a:271",
    "a.jsonl:True": "bd3067de3506bb3b:12", "a.jsonl:False": "58770ec611d02f3e:12",
    "c.jsonl:True": "4d7ae5a3c94a86a9:12", "c.jsonl:False": "fc25174e0ee61db3:12",
}
BEFORE_SMOLLM2 = {
    "calib": "ab499381c680ac58", "eval": "d3e69699b04c5835", "eval_short": "2b469ae1625d4eff",
    "nonmembers": "2503074637e71707",
    "t.txt:True": "a9363e5b389ae4bf:75", "t.txt:False": "ae00a8a2d4f8286c:75",
    "a.jsonl:True": "52e60c14171a3c2f:12", "a.jsonl:False": "7339e56cfa53a60c:12",
    "c.jsonl:True": "75b807710c0f833f:12", "c.jsonl:False": "d546d9d8e9d36eb8:12",
}
BEFORE_SELF = "46a458893c5d4e46"  # generate_calibration(tiny llama, char tokenizer, 3, 8, seed=4)


def test_a_tokenizer_that_adds_nothing_gives_the_ids_it_gave(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from subspace_cli.pipelines.self_calibration import generate_calibration

    tokenizer = make_char_tokenizer()  # declares <s> and </s>, adds neither, as GPT-2's and SmolLM2's
    tokenizer.chat_template = CHAT_TEMPLATE
    assert _fingerprints(tokenizer, tmp_path) == BEFORE_CHAR
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert _digest(generate_calibration(model, tokenizer, 3, 8, seed=4)) == BEFORE_SELF


@pytest.mark.builtin
def test_smollm2_ids_are_unchanged(tmp_path):
    """The built-in model's tokenizer adds nothing, so every published figure of it still holds."""
    from transformers import AutoTokenizer

    from subspace_cli.io.builtins import resolve_builtin_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin_model("smollm2-135m"))
    assert data.special_tokens(tokenizer) == data.SpecialTokens((), ())
    assert _fingerprints(tokenizer, tmp_path) == BEFORE_SMOLLM2


# ------------------------------------------------------------------- windows with a BOS


def test_calibration_rows_are_bos_and_seqlen_minus_one_text_tokens(bos_tok, tmp_path):
    ids = data.tokenize_text(bos_tok, TEXT)  # [n_tokens], no special tokens
    rows = data.sample_calibration(bos_tok, TEXT, 16, 32, seed=3)
    assert rows.shape == (16, 32) and _starts_with_one_bos(rows) and not (rows[:, 1:] == BOS).any()
    starts = data.window_starts(ids.numel(), 16, 31, seed=3)  # the text part is the window of 31 at each start
    assert torch.equal(rows[:, 1:], ids[starts[:, None] + torch.arange(31)])
    for name, text in (("a.txt", TEXT), ("b.txt", RETAIN_TEXT)):
        (tmp_path / name).write_text(text)
    mixed = data.resolve_calibration([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], bos_tok, 5, 24, seed=0)
    assert mixed.input_ids.shape == (5, 24) and _starts_with_one_bos(mixed.input_ids)


def test_eval_windows_open_with_bos_and_score_every_text_token_once(bos_tok):
    ids = data.tokenize_text(bos_tok, TEXT[:2000])
    windows = data.eval_windows(bos_tok, TEXT, 32, max_chars=2000)
    n = ids.numel() // 31
    assert windows.shape == (n, 32) and _starts_with_one_bos(windows)
    assert torch.equal(windows[:, 1:].flatten(), ids[: n * 31])  # consecutive, non-overlapping
    short = data.eval_windows(bos_tok, "To be", 32)  # one short window: BOS + the 5 tokens
    assert short.tolist() == [[BOS] + data.tokenize_text(bos_tok, "To be").tolist()]


def test_membership_windows_are_cut_like_the_training_rows(bos_tok):
    members = data.sample_calibration(bos_tok, TEXT, 8, 32, seed=3)
    others = data.nonmember_windows(bos_tok, TEXT, 8, 32, member_seed=3, seed=5)
    assert others.shape[1] == members.shape[1] == 32 and others.shape[0] > 0
    assert _starts_with_one_bos(others)
    ids = data.tokenize_text(bos_tok, TEXT)
    taken = data.window_starts(ids.numel(), 8, 31, seed=3)
    covered = set((taken[:, None] + torch.arange(31)).flatten().tolist())
    text = ids.unfold(0, 31, 1)  # [n_tokens − 30, 31] every window of 31 text tokens
    for row in others[:, 1:]:  # every non-member's text lies in the pool and touches no member position
        start = int((text == row).all(1).nonzero()[0])
        assert not covered & set(range(start, start + 31))


def test_self_calibration_starts_from_bos_and_keeps_it(bos_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subspace_cli.pipelines.self_calibration import generate_calibration

    model = AutoModelForCausalLM.from_pretrained(bos_llama).eval()
    rows = generate_calibration(model, AutoTokenizer.from_pretrained(bos_llama), 3, 8, seed=4)
    assert rows.shape == (3, 8) and (rows[:, 0] == BOS).all()


def _assert_cut_from(rows: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Rows are consecutive pieces of the stream (ids, labels) [n]: a row that starts at an example's
    own BOS is the stream as is; any other is a BOS (no loss) the cut added, then the stream. Returns
    the stream tokens the rows hold."""
    at = 0
    for row_ids, row_labels in rows:
        if ids[at] != BOS:
            assert row_ids[0] == BOS and row_labels[0] == IGNORE_INDEX, at
            row_ids, row_labels = row_ids[1:], row_labels[1:]
        n = row_ids.numel()
        assert torch.equal(row_ids, ids[at : at + n]) and torch.equal(row_labels, labels[at : at + n]), at
        at += n
    return at


def _real(batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(i[m == 1], lab[m == 1]) for i, lab, m in zip(batch.input_ids, batch.labels, batch.attention_mask)]


@pytest.mark.parametrize("name", ["t.txt", "a.jsonl", "c.jsonl", "c-bos.jsonl"])
@pytest.mark.parametrize("packing", [True, False])
def test_training_rows_open_with_one_bos_and_lose_no_token(bos_tok, tmp_path, name, packing):
    root = _inputs(tmp_path)
    tokenizer = bos_tok
    if name == "c-bos.jsonl":  # a chat template that writes the BOS itself: still one
        tokenizer = make_char_tokenizer(bos=True)
        tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
        name = "c.jsonl"
    whole = load_training_data([str(root / name)], tokenizer, seqlen=100_000, packing=False)  # one row per example
    cut = load_training_data([str(root / name)], tokenizer, seqlen=24, packing=packing)
    for split in ("train", "eval"):
        examples = _real(getattr(whole, split))
        assert all(ids[0] == BOS and ids[1] != BOS and (ids == BOS).sum() == 1 for ids, _ in examples)
        batch = getattr(cut, split)
        assert _starts_with_one_bos(batch.input_ids), split
        stream_ids = torch.cat([ids for ids, _ in examples])  # bos ... eos per example
        stream_labels = torch.cat([labels for _, labels in examples])
        if packing or name == "t.txt":  # rows cut from a stream (packing) or from one document each
            held = _assert_cut_from(_real(batch), stream_ids, stream_labels)
            assert stream_ids.numel() - held < (24 if packing else 1)  # packing drops only the ragged tail
        else:  # one row per record, truncated
            assert [ids.tolist() for ids, _ in _real(batch)] == [ids[:24].tolist() for ids, _ in examples]
    if name == "t.txt" and not packing:
        assert cut.n_examples == len(cut.train) + len(cut.eval)  # a document counts as the chunks it is cut into


# ------------------------------------------------------------------------ every verb


@pytest.fixture()
def seen(monkeypatch):
    """Every [b, L] batch of token ids fed to the model's token embedding during a run."""
    batches = []
    original = torch.nn.Embedding.forward

    def forward(self, input):
        if input.dim() == 2 and self.num_embeddings == VOCAB:
            batches.append(input.detach().cpu().clone())
        return original(self, input)

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)
    return batches


def _check(batches: list[torch.Tensor], verb: str) -> None:
    assert batches, f"{verb}: no token ids reached the model"
    # [b, 1] batches are the decode steps of the reports' greedy samples, after a prompt checked here.
    rows = [ids for ids in batches if ids.shape[1] > 1]
    assert rows, f"{verb}: only single tokens reached the model"
    for ids in rows:
        assert _starts_with_one_bos(ids), (verb, ids[:, :4])


@pytest.fixture(scope="module")
def bos_family(tmp_path_factory, bos_llama):
    root = tmp_path_factory.mktemp("bos-family")
    return [bos_llama] + [use_bos_tokenizer(perturbed_copy(bos_llama, root / name, seed)) for name, seed in
                          (("a", 1), ("b", 2))]


@pytest.mark.slow
def test_every_verb_feeds_the_model_rows_that_open_with_one_bos(bos_llama, bos_family, tmp_path, seen):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    retain = tmp_path / "retain.txt"
    retain.write_text(RETAIN_TEXT)
    alpaca = _inputs(tmp_path / "in") / "a.jsonl"
    base, a, b = bos_family
    runs = {
        "compress": ("compress", bos_llama, "--out", tmp_path / "c", "--calib", text, "--calib-samples", 4,
                     "--calib-seqlen", 16, "--eval-seqlen", 16, "--eval-chars", 400, "--ratio", 0.3),
        "inspect": ("inspect", bos_llama, "--calib", text, "--calib-samples", 2, "--calib-seqlen", 16, "--json"),
        "eval": ("eval", bos_llama, "--data", text, "--baseline", bos_llama, "--eval-seqlen", 16, "--json"),
        "adapt": ("adapt", bos_llama, "--method", "lora", "--data", text, "--out", tmp_path / "a", "--rank", 2,
                  "--steps", 2, "--seqlen", 16, "--batch-size", 2, "--eval-every", 1),
        "adapt alpaca unpacked": ("adapt", bos_llama, "--method", "dora", "--data", alpaca, "--out", tmp_path / "aa",
                                  "--rank", 2, "--steps", 2, "--seqlen", 200, "--batch-size", 2, "--no-packing"),
        "unlearn": ("unlearn", bos_llama, "--method", "grad-diff", "--forget", text, "--retain", retain,
                    "--out", tmp_path / "u", "--forget-samples", 4, "--retain-samples", 4, "--seqlen", 16,
                    "--eval-seqlen", 16, "--eval-chars", 400, "-O", "steps=2", "-O", "batch_size=2"),
        "merge": ("merge", a, b, "--base", base, "--method", "concrete", "--data", text, "--data", retain,
                  "--samples", 4, "--seqlen", 16, "-O", "steps=2", "-O", "batch_size=2", "--eval", f"one={text}",
                  "--eval", f"two={retain}", "--eval-seqlen", 16, "--eval-chars", 400, "--out", tmp_path / "m"),
    }
    for verb, args in runs.items():
        seen.clear()
        result = _invoke(*args)
        assert result.exit_code == 0, (verb, result.output)
        _check(seen, verb)


def test_eval_perplexity_is_the_direct_one_on_bos_windows(bos_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = _invoke("eval", bos_llama, "--data", text, "--eval-seqlen", 32, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    held = data.split_holdout(TEXT)[1]
    ids = make_char_tokenizer()(held, add_special_tokens=False)["input_ids"]  # one id per character
    n = len(ids) // 31
    windows = torch.tensor([[BOS] + ids[i * 31 : (i + 1) * 31] for i in range(n)])  # [n, 32]
    model = AutoModelForCausalLM.from_pretrained(bos_llama).eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()  # [n, 32, V]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert out["n_windows"] == n and out["n_tokens"] == n * 31  # every text token scored, the BOS never
    assert out["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-6)
