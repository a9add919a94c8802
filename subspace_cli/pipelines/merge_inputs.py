"""The merge verb's inputs, checked before any output is written (exit 2 on bad input).

  open_inputs         resolve --base and the models, check their config.json (a JSON object, not
                      quantized, one model_type) and the reference's tokenizer files, and open them as
                      lazy readers; a LoRA adapter sits on --base, which must be the base it was trained on.
  check_vocabularies  same tokens with the same ids in every full checkpoint.
  require_finite      a tensor read from an input is finite (merging NaN / Inf only spreads them).
  task_batches, eval_windows   --data and --eval text, with merge's own flags in the messages
                      (io/data.py's messages name the flags merge passes it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.lazy_checkpoint import LazyCheckpoint
from subspace_cli.io.lora_checkpoint import LoraCheckpoint, is_lora_adapter
from subspace_cli.io.models import TOKENIZER_FILES, resolve_model_path
from subspace_cli.pipelines.merge_config import MergeConfig

log = logging.getLogger(__name__)


def input_labels(refs: list[str]) -> list[str]:
    """Report labels for the inputs: the references, numbered where the same one appears twice."""
    return [ref if refs.count(ref) == 1 else f"{ref}#{i + 1}" for i, ref in enumerate(refs)]


def model_dir(checkpoint) -> Path:
    return Path(getattr(checkpoint, "path", None) or checkpoint.base.path)


_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "merges.txt", "added_tokens.json")


# ----------------------------------------------------------------------------- config.json


def read_model_config(directory: Path, label: str) -> dict:
    """config.json of a merge input as a dict; exit 2 when it is missing, not JSON, not an object or
    quantized (packed integer weights cannot be merged as floats)."""
    from subspace_cli.modules.loading import _refuse_quantized

    file = directory / "config.json"
    if not file.is_file():
        raise UsageError(f"model '{label}' has no config.json in '{directory}'; pass a Hugging Face model directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"'{file}' (model '{label}') is not valid JSON: {err}; it must be a Hugging Face "
                         "config.json object") from err
    if not isinstance(data, dict):
        raise UsageError(f"'{file}' (model '{label}') holds a JSON {type(data).__name__}, not an object; it must be "
                         "a Hugging Face config.json object")
    _refuse_quantized(directory, data)
    return data


def check_model_configs(reference: tuple[str, Path], models: list[tuple[str, Path]], config: MergeConfig) -> None:
    """Every full checkpoint has the reference's model_type, and the reference has a tokenizer (it is
    copied into the merged checkpoint) and the positions --seqlen / --eval-seqlen ask for. `reference` is
    (label, directory): the base, else the first model."""
    from subspace_cli.evaluate.perplexity import check_seqlen

    ref_label, ref_dir = reference
    ref_config = read_model_config(ref_dir, ref_label)
    if config.eval:
        check_seqlen(ref_config, config.eval_seqlen, "--eval-seqlen")
    if config.data:
        check_seqlen(ref_config, config.seqlen, "--seqlen")
    wanted = ref_config.get("model_type")
    for label, directory in models:
        got = read_model_config(directory, label).get("model_type")
        if got != wanted:
            raise UsageError(f"model '{label}' is model_type {got!r} and {ref_label} is {wanted!r} (config.json); "
                             "merging needs models of one architecture fine-tuned from one base")
    if not any((ref_dir / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{ref_label} has no tokenizer files in '{ref_dir}' (looked for {', '.join(TOKENIZER_FILES)}); "
                         "the merged checkpoint takes its tokenizer from there and would have none: add them "
                         "(tokenizer.save_pretrained) or use a copy of the model that has them")


# ----------------------------------------------------------------------------- LoRA bases


def _resolve_trained_on(ref: str) -> Path | None:
    """The local directory of the base an adapter names, or None when it is not available here.
    Never downloads: resolve_model_path fetches an uncached hub id when online, which a check must not do."""
    path = Path(ref).expanduser()
    if ref.startswith("builtin:") or path.is_dir():
        try:
            return resolve_model_path(ref)
        except UsageError:
            return None
    if path.exists() or path.is_absolute() or ref.startswith((".", "~")):
        return None  # a file, or a local path that is not here
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "config.json")
    except (OSError, ValueError):  # not a valid repo id (HFValidationError), unreadable cache: not available here
        return None
    return Path(found).parent if isinstance(found, str) else None


def _tensor_in(checkpoint: LazyCheckpoint, name: str) -> str | None:
    """`name` in `checkpoint`, allowing one leading component more or less (GPT-2's 'transformer.h.0...'
    is saved as 'h.0...' by some exporters)."""
    if name in checkpoint:
        return name
    rest = name.partition(".")[2]
    if rest and rest in checkpoint:
        return rest
    return next((n for n in checkpoint.names() if n.endswith("." + name)), None)


def _first_difference(trained_on: LazyCheckpoint, base: LazyCheckpoint, names: list[str]) -> str | None:
    """Where two base directories differ on `names` (bitwise), or None when they agree."""
    for name in names:
        theirs = _tensor_in(trained_on, name)
        if theirs is None:
            return f"it has no tensor '{name}'"
        if trained_on.shape(theirs) != base.shape(name) or trained_on.dtype(theirs) != base.dtype(name):
            return (f"tensor '{name}' is {trained_on.dtype(theirs)} {trained_on.shape(theirs)} there and "
                    f"{base.dtype(name)} {base.shape(name)} in --base")
        a, b = trained_on.get(theirs).reshape(-1), base.get(name).reshape(-1)
        if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            return f"tensor '{name}' differs"
    return None


def check_adapter_base(config: MergeConfig, base: LazyCheckpoint, adapter: LoraCheckpoint, label: str,
                       notes: list[str]) -> None:
    """Refuse (exit 2) an adapter trained on another base of the same shape: it would merge silently into
    a wrong model. Bases that cannot be found here are noted, not refused (the check cannot tell)."""
    ref = adapter.trained_on
    if config.force_base:
        if ref is not None and ref != config.base:
            notes.append(f"adapter '{label}' (trained on '{ref}') applied to --base '{config.base}' unchecked (--force-base)")
        return

    def unchecked(why: str) -> None:
        message = (f"adapter '{label}' {why}; it is applied to --base '{config.base}' without checking that this "
                   "is the model it was trained on")
        log.warning(message)
        notes.append(message)

    if ref is None:
        return unchecked("names no base model (no base_model_name_or_path in its adapter_config.json)")
    path = _resolve_trained_on(ref)
    if path is None:
        return unchecked(f"was trained on '{ref}', which is not available locally")
    if path.resolve() == base.path.resolve():
        return
    # Another directory may hold a copy of the same model. A different base of the same shape (another
    # fine-tune, another seed) differs in practically every tensor, so the first and last targeted
    # tensors settle it at the cost of two reads from each.
    targeted = adapter.targeted
    sample = list(dict.fromkeys(targeted[:1] + targeted[-1:]))
    try:
        with LazyCheckpoint(path, allow_pickle=config.allow_pickle) as trained_on:
            difference = _first_difference(trained_on, base, sample)
    except UsageError as err:
        return unchecked(f"was trained on '{ref}', whose weights cannot be read ({err})")
    if difference is not None:
        where = f"'{ref}'" if Path(ref).expanduser() == path.resolve() else f"'{ref}' ({path.resolve()})"
        raise UsageError(f"adapter '{label}' was trained on {where}, not on --base '{config.base}': {difference}; "
                         "pass the model it was trained on as --base, or --force-base to merge it onto this base anyway")


# ----------------------------------------------------------------------------- opening


def open_inputs(config: MergeConfig, stack: contextlib.ExitStack, notes: list[str] | None = None):
    """(base checkpoint or None, [input checkpoints]) as lazy readers; LoRA adapters sit on the base.
    Everything is checked before a tensor is read: configs, the tokenizer, layouts of adapters, their base."""
    notes = notes if notes is not None else []
    base_dir = resolve_model_path(config.base) if config.base is not None else None
    sources = []  # (label, directory, is_adapter)
    for ref, label in zip(config.models, input_labels(config.models)):
        path = Path(ref).expanduser()
        if path.is_dir() and is_lora_adapter(path):
            if base_dir is None:
                raise UsageError(f"model '{ref}' is a LoRA adapter; pass --base, the model it was trained on")
            sources.append((label, path, True))
        else:
            sources.append((label, resolve_model_path(ref), False))
    full = [(label, path) for label, path, adapter in sources if not adapter]
    reference = (f"the base '{config.base}'", base_dir) if base_dir is not None else (f"model '{full[0][0]}'", full[0][1])
    check_model_configs(reference, full if base_dir is not None else full[1:], config)
    base = None
    if base_dir is not None:
        base = stack.enter_context(LazyCheckpoint(base_dir, allow_pickle=config.allow_pickle))
    inputs = []
    for label, path, adapter in sources:
        if adapter:
            lora = stack.enter_context(LoraCheckpoint(base, path, allow_pickle=config.allow_pickle))
            check_adapter_base(config, base, lora, label, notes)
            inputs.append(lora)
        else:
            inputs.append(stack.enter_context(LazyCheckpoint(path, allow_pickle=config.allow_pickle)))
    return base, inputs


def _tokenizer_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in _VOCAB_FILES if (directory / name).is_file()}


def check_vocabularies(reference, reference_label: str, others: list, labels: list[str]) -> None:
    """Same tokens with the same ids everywhere (shapes alone miss a reordered vocabulary). Tokenizers
    are loaded only where the vocabulary files are not byte-identical to the reference's."""
    def vocab(checkpoint):
        from transformers import AutoTokenizer

        directory = model_dir(checkpoint)
        if not any((directory / name).is_file() for name in _VOCAB_FILES[:4]):
            return None
        return AutoTokenizer.from_pretrained(directory).get_vocab()

    reference_files = _tokenizer_files(model_dir(reference))
    if not any(name in reference_files for name in _VOCAB_FILES[:4]):
        return
    wanted = None
    for checkpoint, label in zip(others, labels):
        if isinstance(checkpoint, LoraCheckpoint):
            continue  # an adapter uses its base's tokenizer
        if _tokenizer_files(model_dir(checkpoint)) == reference_files:
            continue  # byte-identical vocabulary files: nothing to load
        wanted = wanted if wanted is not None else vocab(reference)
        got = vocab(checkpoint)
        if got is None or got == wanted:
            continue
        token = next((t for t in sorted(wanted, key=wanted.get) if got.get(t) != wanted[t]), None)
        detail = f"token {token!r} has id {got.get(token)} there and {wanted[token]} in {reference_label}" if token \
            else f"{len(got)} tokens against {len(wanted)}"
        raise UsageError(f"model '{label}' has a different vocabulary from {reference_label}: {detail}; "
                         "merging needs one tokenizer")


def require_finite(tensor: torch.Tensor, model: str, name: str) -> None:
    """Exit 2 for an input tensor with NaN or Inf: the merge would only spread them."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise UsageError(f"model '{model}' has non-finite values (NaN or Inf) in tensor '{name}'; merging needs "
                         "finite weights: repair or re-export that checkpoint, or leave it out")


# ----------------------------------------------------------------------------- text


def _load(flag: str, spec: str, heldout: bool) -> str:
    """The text of one source: its first 95% (what is sampled), or the last 5% (held out)."""
    from subspace_cli.io import data

    return data.split_holdout(data.load_text(spec, flag))[1 if heldout else 0]


def task_batches(config: MergeConfig, tokenizer) -> list[torch.Tensor]:
    """concrete: config.samples windows of config.seqlen tokens from each --data source, [samples, seqlen]
    each; the same windows as io.data.resolve_calibration([spec], ...) (first 95% of the text, seed + i)."""
    from subspace_cli.io import data

    flags = data.SampleFlags(source="--data", samples="--samples", seqlen="--seqlen")
    return [data.sample_calibration(tokenizer, _load("--data", spec, heldout=False), config.samples, config.seqlen,
                                    config.seed + i, flags, spec)
            for i, spec in enumerate(config.data)]


def heldout_texts(config: MergeConfig) -> dict[str, str]:
    """--eval: each task's held-out text (the last 5% of its source)."""
    return {task: _load("--eval", source, heldout=True) for task, _, source in
            (pair.partition("=") for pair in config.eval)}


def eval_windows(config: MergeConfig, tokenizer, texts: dict[str, str]) -> dict[str, torch.Tensor]:
    """--eval: each task's held-out windows [n, eval_seqlen], read before the merge so a bad source fails fast."""
    from subspace_cli.io import data

    return {task: data.eval_windows(tokenizer, text, config.eval_seqlen, config.eval_chars,
                                    what=f"the held-out 5% of --eval '{pair}'")
            for (task, text), pair in zip(texts.items(), config.eval)}
