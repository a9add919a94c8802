"""Writing (factored) Hugging Face checkpoints; output directories are io/output_dir.py.

The on-disk format is documented in docs/format.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from subspace_cli.modules import remote_modeling
from subspace_cli.modules.lowrank import factored_layout, layout_format_version

MODELING_FILE = "modeling_subspace.py"

# Copied from the source checkpoint when present (tokenizers and generation defaults).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
    "vocab.json", "tokenizer.model", "spiece.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)

# Auto class that should load each architecture, most specific first; "AutoModel" otherwise.
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)


# ----------------------------------------------------------------------------- checkpoints


def param_count(model: nn.Module) -> int:
    """Number of parameters, counting each shared (tied) tensor once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # already de-duplicated by identity
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def transformers_base_class(model: nn.Module) -> type:
    """The transformers class a model is (or derives from, for a Subspace* remote class)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise ValueError(f"{type(model).__name__} is not a transformers model")


def auto_class_for(architecture: str) -> str:
    """Name of the transformers Auto class that should load `architecture` (AutoModel by default)."""
    from transformers.models.auto import modeling_auto

    for table, auto_name in _AUTO_CLASSES:
        for value in getattr(modeling_auto, table, {}).values():
            names = value if isinstance(value, (tuple, list)) else (value,)
            if architecture in names:
                return auto_name
    return "AutoModel"


def modeling_source(base_architecture: str) -> str:
    """Text of the modeling_subspace.py written into a factored checkpoint."""
    source = Path(remote_modeling.__file__).read_text(encoding="utf-8")
    return (source.rstrip("\n") + "\n\n\n# Written by subspace: the class named in config.json's auto_map.\n"
            f'Subspace{base_architecture} = build_model_class("{base_architecture}")\n')


def _check_layout(model: nn.Module, layout: dict | None) -> dict:
    found = factored_layout(model)
    if layout is None:
        return found
    layout = {path: dict(spec) for path, spec in layout.items()}
    if layout != found:
        missing = sorted(set(found) - set(layout))
        extra = sorted(set(layout) - set(found))
        raise ValueError(
            "layout does not describe the model's factored modules "
            f"(factored modules not in layout: {missing[:5]}, layout entries not factored: {extra[:5]}, "
            "or ranks/shapes differ); pass layout=None to derive it from the model")
    return found


def write_checkpoint(model: nn.Module, out_dir: Path, *, source_dir: Path | None = None,
                     layout: dict | None = None, max_shard_size: int | str = "2GB") -> Path:
    """Write `model` as a Hugging Face checkpoint (safetensors) into `out_dir`; returns out_dir.

    If the model holds factored modules (`layout`, derived from the model when None), config.json
    gets the `subspace` section and `auto_map`, and `modeling_subspace.py` is written beside it.
    Tokenizer files and generation_config.json are copied from `source_dir` when present.
    `model.config` is not modified.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = _check_layout(model, layout)
    base = transformers_base_class(model).__name__

    model.save_pretrained(out_dir, max_shard_size=max_shard_size)

    if source_dir is not None:
        for name in COPIED_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copyfile(src, out_dir / name)

    # Edit the written config.json rather than model.config, so the caller's model is unchanged.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("subspace", None)
    if MODELING_FILE.removesuffix(".py") in json.dumps(config.get("auto_map", {})):
        config.pop("auto_map")  # stale, e.g. a factored model that was made dense again
    (out_dir / MODELING_FILE).unlink(missing_ok=True)
    config["architectures"] = [base]
    if layout:
        config["subspace"] = {
            "format_version": layout_format_version(layout),
            "kind": "factored",
            "base_architecture": base,
            "modules": dict(sorted(layout.items())),
        }
        config["auto_map"] = {auto_class_for(base): f"{MODELING_FILE.removesuffix('.py')}.Subspace{base}"}
        (out_dir / MODELING_FILE).write_text(modeling_source(base), encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir
