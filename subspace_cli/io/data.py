"""Text sources, calibration sampling and the held-out split.

A source spec is one of
  PATH.txt (or any file)  one document
  DIR                     its *.txt files, recursively, sorted by relative path (hidden ones skipped)
  PATH.jsonl              one document per line, from the line's "text" field
  builtin:shakespeare     see io/builtins.py
  builtin:kjv
Several sources are given as a list or comma-separated (`builtin:shakespeare,builtin:kjv`).

Each source is used as one text (its documents joined by the source's joiner) and split once by
character position: the first 95% is the calibration pool, the last 5% is held out for
evaluation, so no evaluated character was ever in a calibration window.

Windows follow the tokenizer's own special tokens: where `tokenizer(text)` opens with a BOS
(Llama, Mistral, Gemma), every calibration, evaluation and membership window opens with it too
and holds seqlen − 1 text tokens; where it adds nothing (GPT-2, SmolLM2, Qwen) a window is
seqlen text tokens, exactly as before.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from subspace_cli.errors import UsageError
from subspace_cli.io.builtins import BUILTIN_CORPORA, builtin_corpus

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_JOINER = "\n\n"  # between documents of a user source (builtin corpora bring their own)
HOLDOUT_FRACTION = 0.05
EVAL_MAX_CHARS = 40_000
SELF_SPEC = "self"  # text sampled from the model itself; produced by the pipeline, not loaded here
_TOKENIZE_CHUNK_CHARS = 1 << 16
_VALID_SPECS = "a text file, a directory of .txt files, a .jsonl file with a \"text\" field, " + " or ".join(
    f"builtin:{name}" for name in BUILTIN_CORPORA
)


# ---------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class TextSource:
    """The documents of one source and how they are joined into one text."""

    name: str  # the spec as given
    documents: tuple[str, ...]
    joiner: str = DEFAULT_JOINER

    @property
    def text(self) -> str:
        return self.joiner.join(self.documents)


def split_specs(specs: str | Sequence[str], flag: str = "--calib") -> list[str]:
    """Expand comma-separated specs into a list of single specs (order kept, duplicates dropped).

    A spec that names an existing path is never split, so file names with commas still work.
    """
    items = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for item in items:
        parts = [item] if Path(item).expanduser().exists() else item.split(",")
        for part in (p.strip() for p in parts):
            if part and part not in out:
                out.append(part)
    if not out:
        raise UsageError(f"no data given to {flag} ({specs!r}); pass {_VALID_SPECS}")
    return out


def load_source(spec: str, flag: str = "--calib") -> TextSource:
    """Load one source spec; UsageError naming `flag` (the option that gave it) if it is missing,
    malformed or empty."""
    if spec == SELF_SPEC:
        raise UsageError(
            f"{flag} 'self' (text sampled from the model) is only available as compress / inspect calibration "
            f"data; pass {_VALID_SPECS}"
        )
    joiner = DEFAULT_JOINER
    if spec.startswith("builtin:"):
        corpus = builtin_corpus(spec)
        documents, joiner = corpus.load(), corpus.joiner
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            hint = f" (did you mean builtin:{spec}?)" if spec in BUILTIN_CORPORA else ""
            raise UsageError(f"{flag} '{spec}' does not exist{hint}; pass {_VALID_SPECS}")
        if path.is_dir():
            documents = _read_dir(path, flag)
        elif path.suffix == ".jsonl":
            documents = _read_jsonl(path, spec)
        else:
            documents = [_read_text(path, flag)]
    documents = [d for d in documents if d.strip()]  # blank documents would only add joiners
    if not documents:
        found = " (no .txt files in it)" if Path(spec).expanduser().is_dir() else ""
        raise UsageError(f"{flag} '{spec}' is empty{found}; pass a source with text")
    return TextSource(spec, tuple(documents), joiner)


def load_documents(spec: str, flag: str = "--calib") -> list[str]:
    """The non-empty documents of source `spec`, in a fixed order."""
    return list(load_source(spec, flag).documents)


def load_text(spec: str, flag: str = "--calib") -> str:
    """Source `spec` as one text (documents joined by the source's joiner)."""
    return load_source(spec, flag).text


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # universal newlines: \r\n -> \n
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} file '{path}' is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{flag} file '{path}' cannot be read: {exc.strerror or exc}") from None


def _read_dir(path: Path, flag: str) -> list[str]:
    files = [
        p for p in path.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    return [_read_text(p, flag) for p in sorted(files, key=lambda p: p.relative_to(path).as_posix())]


def _read_jsonl(path: Path, spec: str) -> list[str]:
    rule = 'each line must be a JSON object with a string "text" field'
    documents = []
    with open(path, encoding="utf-8-sig") as handle:
        for lineno, line in _lines(handle, spec):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"line {lineno} of '{spec}' is not valid JSON ({exc.msg}); {rule}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"line {lineno} of '{spec}' has no string \"text\" field; {rule}")
            documents.append(record["text"])
    return documents


def _lines(handle, spec: str) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        for lineno, line in enumerate(handle, start=1):
            yield lineno, line
    except UnicodeDecodeError as exc:
        raise UsageError(f"line {lineno + 1} of '{spec}' is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None


# -------------------------------------------------------------------------------- splitting


def split_holdout(text: str, holdout_fraction: float = HOLDOUT_FRACTION) -> tuple[str, str]:
    """(pool, heldout): the first (1 - f) of the characters and the rest; disjoint by position."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise UsageError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    cut = len(text) - round(len(text) * holdout_fraction)
    return text[:cut], text[cut:]


def load_heldout(spec: str, holdout_fraction: float = HOLDOUT_FRACTION, flag: str = "--eval") -> str:
    """The held-out (last `holdout_fraction`) text of source `spec`."""
    return split_holdout(load_text(spec, flag), holdout_fraction)[1]


# ------------------------------------------------------------------------------ tokenizing

# A lone newline between non-space characters: a pre-tokenizer boundary for byte-level BPE and
# WordPiece, so tokenizing chunks cut there gives the same ids as tokenizing the whole text.
_CHUNK_BOUNDARY = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        match = _CHUNK_BOUNDARY.search(text, start + size) if start + size < len(text) else None
        end = match.end() if match else len(text)
        yield text[start:end]
        start = end


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` without special tokens: LongTensor [n_tokens].

    Long texts are cut at line starts into ~64k-character chunks and encoded as one batch, which
    the fast (Rust) tokenizers encode in parallel and without the max-length warning.
    """
    import torch

    chunks = list(_chunks(text, _TOKENIZE_CHUNK_CHARS))
    if not chunks:
        return torch.empty(0, dtype=torch.long)
    encoded = tokenizer(
        chunks, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )["input_ids"]
    return torch.tensor(list(itertools.chain.from_iterable(encoded)), dtype=torch.long)


# A short text every tokenizer encodes to at least one token, to see what it adds around a text.
_PROBE_TEXT = "Hello world"


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a tokenizer puts around every text it encodes with its defaults.

    prefix: (bos,) for Llama-2/3, Mistral, Gemma; () for GPT-2, SmolLM2, Qwen.
    suffix: what it appends (an EOS for a few). Windows cut from running text never get it: the
    text goes on past the window's end, and a causal LM that sees EOS there learns (or is scored on)
    an end that is not one. A true end (the end of a training example) gets the tokenizer's EOS
    in io/training_data.py whether or not the tokenizer appends it, as before.
    """

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()


def special_tokens(tokenizer) -> SpecialTokens:
    """What `tokenizer` adds around a text: `tokenizer(t)` against `tokenizer(t, add_special_tokens=False)`.

    Asked of the tokenizer rather than read from `bos_token_id`: SmolLM2 and Qwen declare a BOS
    they never add, and a model is trained (and must be calibrated and scored) on what its
    tokenizer produces.
    """
    kwargs = {"return_attention_mask": False, "return_token_type_ids": False, "verbose": False}
    full = list(tokenizer(_PROBE_TEXT, **kwargs)["input_ids"])
    plain = list(tokenizer(_PROBE_TEXT, add_special_tokens=False, **kwargs)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return SpecialTokens(tuple(full[:start]), tuple(full[start + len(plain):]))
    logger.warning("the tokenizer encodes a text differently with and without special tokens (%s against %s); "
                   "adding no special tokens to windows", full, plain)
    return SpecialTokens()


def text_length(seqlen: int, prefix: tuple[int, ...], flag: str) -> int:
    """Text tokens in a window of `seqlen` that opens with `prefix`; UsageError if none fit."""
    if seqlen <= len(prefix):
        raise UsageError(f"{flag} {seqlen} leaves no room for text after the tokenizer's {len(prefix)} start "
                         f"token(s) (BOS); use at least {len(prefix) + 1}")
    return seqlen - len(prefix)


def with_prefix(windows: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    """`prefix` put before every row: [n, L] -> [n, len(prefix) + L] (the input itself when empty)."""
    import torch

    if not prefix:
        return windows
    head = torch.tensor(prefix, dtype=windows.dtype).expand(windows.shape[0], len(prefix))  # [n, p]
    return torch.cat([head, windows], dim=1)


def _check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


@dataclass(frozen=True)
class SampleFlags:
    """The options a verb names its sampled text by, so messages point at flags it has."""

    source: str = "--calib"
    samples: str = "--calib-samples"
    seqlen: str = "--calib-seqlen"


CALIBRATION = SampleFlags()


def sample_calibration(tokenizer, text: str, n_samples: int, seqlen: int, seed: int, flags: SampleFlags = CALIBRATION,
                       source: str | None = None) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from `text`: LongTensor [n_samples, seqlen].

    Window starts are drawn uniformly (with replacement) from one seeded generator, so the same
    text, tokenizer and seed always give the same windows. Where the tokenizer opens a text with
    a BOS, each row is the BOS and seqlen − 1 text tokens (`special_tokens`).
    """
    import torch

    _check_positive(n_samples, flags.samples)
    _check_positive(seqlen, flags.seqlen)
    prefix = special_tokens(tokenizer).prefix
    body = text_length(seqlen, prefix, flags.seqlen)  # text tokens per row
    ids = tokenize_text(tokenizer, text)  # [n_tokens]
    n_tokens = ids.numel()
    if n_tokens < body + 1:
        named = f"{flags.source} '{source}'" if source else f"the {flags.source} text"
        needed = f"{flags.seqlen} {seqlen}" + (" less the tokenizer's BOS" if prefix else "")
        raise UsageError(
            f"{named} has {n_tokens} tokens (in the 95% used for sampling), fewer than {needed} + 1; "
            f"give more text or a smaller {flags.seqlen}"
        )
    starts = window_starts(n_tokens, n_samples, body, seed)  # [n_samples]
    index = starts[:, None] + torch.arange(body)  # [n_samples, body]
    logger.debug("sampled %d windows of %d tokens from %d tokens", n_samples, seqlen, n_tokens)
    return with_prefix(ids[index], prefix)  # [n_samples, seqlen]


def window_starts(n_tokens: int, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The start offsets `sample_calibration` draws for a text of `n_tokens` tokens: LongTensor [n_samples]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (n_samples,), generator=generator)


def windows_avoiding(ids: torch.Tensor, taken: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Up to `n_samples` distinct windows of `seqlen` tokens of `ids` [n_tokens] that share no token with
    any window starting at `taken` [m]: LongTensor [k, seqlen], k ≤ n_samples (0 when nothing is free).

    The same text, cut the same way but never trained on: membership inference needs non-members
    from the members' own distribution, which a held-out tail of the text (other books, other
    plays) is not.
    """
    import torch

    n_starts = ids.numel() - seqlen
    if n_starts <= 0:
        return ids.new_zeros((0, seqlen))
    # A start s overlaps a taken window at t when t − seqlen < s < t + seqlen: mark that interval
    # with a difference array, then keep the unmarked starts.
    marks = torch.zeros(n_starts + 1, dtype=torch.int64)
    low = (taken - seqlen + 1).clamp(0, n_starts)
    high = (taken + seqlen).clamp(0, n_starts)
    marks.index_add_(0, low, torch.ones_like(low))
    marks.index_add_(0, high, -torch.ones_like(high))
    free = (marks.cumsum(0)[:n_starts] == 0).nonzero().flatten()  # [n_free] allowed starts
    order = torch.randperm(free.numel(), generator=torch.Generator().manual_seed(seed))[:n_samples]
    starts = free[order].sort().values
    return ids[starts[:, None] + torch.arange(seqlen)]


def nonmember_windows(tokenizer, text: str, n_samples: int, seqlen: int, member_seed: int, seed: int) -> torch.Tensor:
    """Windows of `text` cut like the rows of `sample_calibration(tokenizer, text, n_samples, seqlen,
    member_seed)` (same length, same BOS) that share no text token with any of them: LongTensor
    [k, seqlen], k ≤ n_samples (0 when nothing is free). See `windows_avoiding`."""
    prefix = special_tokens(tokenizer).prefix
    body = text_length(seqlen, prefix, "--seqlen")
    ids = tokenize_text(tokenizer, text)  # [n_tokens]
    taken = window_starts(ids.numel(), n_samples, body, member_seed)  # the members' starts
    return with_prefix(windows_avoiding(ids, taken, n_samples, body, seed), prefix)


def eval_windows(tokenizer, text: str, seqlen: int, max_chars: int | None = EVAL_MAX_CHARS,
                 what: str = "the held-out evaluation text", seqlen_flag: str = "--eval-seqlen") -> torch.Tensor:
    """Non-overlapping windows over the first `max_chars` characters: LongTensor [n, seqlen].

    Where the tokenizer opens a text with a BOS, each window is the BOS and the next seqlen − 1
    text tokens, so every text token is scored once, with the context the model was trained on.
    The ragged tail is dropped, unless it is the only window: then the shape is [1, n] with
    n < seqlen. `what` names the text in messages (e.g. "the held-out 5% of --eval 'notes.txt'").
    """
    _check_positive(seqlen, seqlen_flag)
    prefix = special_tokens(tokenizer).prefix
    body = text_length(seqlen, prefix, seqlen_flag)  # text tokens per window
    ids = tokenize_text(tokenizer, text if max_chars is None else text[:max_chars])  # [n_tokens]
    if ids.numel() + len(prefix) < 2 or ids.numel() == 0:
        raise UsageError(f"{what} has {ids.numel()} token(s); scoring needs at least 2: pass a longer text")
    n_windows = ids.numel() // body
    if n_windows == 0:
        return with_prefix(ids[None, :], prefix)
    return with_prefix(ids[: n_windows * body].view(n_windows, body), prefix)


# ----------------------------------------------------------------------------- calibration


@dataclass
class CalibrationData:
    """Calibration windows from one or more sources, and each source's held-out text."""

    input_ids: torch.Tensor  # [n_samples, seqlen], sources in order, counts[s] rows each
    heldout: dict[str, str]  # source name -> its last holdout_fraction of text
    sources: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # source name -> rows in input_ids


def resolve_calibration(
    specs: str | Sequence[str],
    tokenizer,
    n_samples: int,
    seqlen: int,
    seed: int,
    holdout_fraction: float = HOLDOUT_FRACTION,
    flags: SampleFlags = CALIBRATION,
) -> CalibrationData:
    """Sample calibration windows from each source's pool; the samples are split evenly.

    With k sources, source i gets n_samples // k rows, plus one for the first n_samples % k, and
    uses seed + i (so one source alone gives exactly `sample_calibration(..., seed)`).
    """
    import torch

    _check_positive(n_samples, flags.samples)
    sources = split_specs(specs, flags.source)
    if n_samples < len(sources):
        raise UsageError(
            f"{flags.samples} {n_samples} is fewer than the {len(sources)} {flags.source} sources; "
            f"use at least {len(sources)}"
        )
    base, extra = divmod(n_samples, len(sources))
    batches, heldout, counts = [], {}, {}
    for i, spec in enumerate(sources):
        pool, heldout[spec] = split_holdout(load_text(spec, flags.source), holdout_fraction)
        counts[spec] = base + (1 if i < extra else 0)
        batches.append(sample_calibration(tokenizer, pool, counts[spec], seqlen, seed + i, flags, spec))
        logger.info("calibration: %d windows of %d tokens from %s", counts[spec], seqlen, spec)
    return CalibrationData(torch.cat(batches), heldout, sources, counts)
