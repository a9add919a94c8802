"""Loading checkpoints written by subspace (factored or dense) without remote code.

For a factored checkpoint the model class is `build_model_class(base_architecture)` taken from
this package's own copy of the modeling code, so config.json's `auto_map` and the shipped
modeling_subspace.py are never executed. transformers' from_pretrained builds the model on the
meta device, the factored layout replaces the (meta) dense modules before any weight is read,
and the safetensors tensors are then assigned: the dense weights are never allocated.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.io.devices import check_device
from subspace_cli.io.models import load_tokenizer, resolve_model_path, torch_dtype
from subspace_cli.modules.remote_modeling import FORMAT_VERSION, build_model_class

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


@functools.cache
def _factored_class(base_architecture: str) -> type:
    return build_model_class(base_architecture)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"'{path}' is missing; is '{path.parent}' a Hugging Face checkpoint directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read '{path}': {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"'{path}' holds a JSON {type(data).__name__}, not an object; a Hugging Face config is "
                         "a JSON object ({\"model_type\": ..., ...})")
    return data


def _refuse_quantized(path: Path, config: dict) -> None:
    """A quantized checkpoint (GPTQ, AWQ, bitsandbytes, ...) stores its Linear weights as packed
    integers, which no subspace method can factor or train."""
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise UsageError(f"model '{path}' is quantized (quant_method: {method}); subspace needs full-precision "
                         "weights (fp32, bf16 or fp16): pass the unquantized checkpoint, or dequantize it first")


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a checkpoint directory (shards listed by the index, or the single file)."""
    for index_name, single_name, pickled in ((SAFE_INDEX, SAFE_SINGLE, False),
                                             (PICKLE_INDEX, PICKLE_SINGLE, True)):
        index, single = path / index_name, path / single_name
        if not index.exists() and not single.exists():
            continue
        if pickled and not allow_pickle:
            raise UsageError(f"'{path}' only has pickle weights ({single_name}); pickle can run code when "
                             "loaded, pass --allow-pickle if you trust the source")
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UsageError(f"'{index}' has no weight_map")
            files = [path / name for name in sorted(set(weight_map.values()))]
        else:
            files = [single]
        for f in files:
            if not f.is_file():
                raise UsageError(f"weight file '{f}' is missing from the checkpoint")
        return files
    raise UsageError(f"'{path}' has no weights ({SAFE_SINGLE}, {SAFE_INDEX} or, with --allow-pickle, "
                     f"{PICKLE_SINGLE})")


def _check_safetensors(files: list[Path]) -> None:
    """Open each file's header (cheap, nothing is read) so a corrupt file is named clearly."""
    from safetensors import safe_open

    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises SafetensorError / OSError / ValueError
            raise UsageError(f"corrupt or unreadable safetensors file '{f}': {err}") from err


def _model_class(path: Path, config) -> type:
    import transformers

    section = getattr(config, "subspace", None)
    if section is not None:
        if not isinstance(section, dict) or section.get("kind") != "factored":
            raise UsageError(f"'{path / 'config.json'}': the 'subspace' section is not a factored-checkpoint "
                             "section (expected kind 'factored')")
        version = section.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UsageError(f"'{path}' uses checkpoint format version {version!r}; this subspace supports "
                             f"versions <= {FORMAT_VERSION}: upgrade subspace-cli")
        base = section.get("base_architecture")
        if not isinstance(base, str) or not hasattr(transformers, base):
            raise UsageError(f"'{path / 'config.json'}': unknown base_architecture {base!r}")
        return _factored_class(base)
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise UsageError(f"'{path / 'config.json'}' names no architectures; cannot pick a model class")
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise UsageError(f"'{path / 'config.json'}': architecture {architectures[0]!r} is not in transformers "
                         f"{transformers.__version__} (custom code is not run by load_model)")
    return cls


def _check_loading_info(path: Path, info: dict) -> None:
    problems = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                       ("shape-mismatched", "mismatched_keys")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key, ()))
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{label} tensors {keys[:5]}{more}")
    if info.get("error_msgs"):
        problems.append(f"errors {list(info['error_msgs'])[:3]}")
    if problems:
        raise UsageError(f"weights in '{path}' do not match its config: " + "; ".join(problems))


# Tensors above this many elements are checked in slices, so the check's boolean temporary stays
# small next to a 262k-token embedding.
_FINITE_CHUNK = 1 << 24


def first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter holding NaN or Inf, or None; one read of every weight."""
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.device.type == "meta":
            continue
        flat = param.detach().reshape(-1)
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            if not bool(torch.isfinite(flat[start:start + _FINITE_CHUNK]).all()):
                return name
    return None


def check_finite(model: nn.Module, path: Path) -> None:
    """Exit 2 naming the first non-finite tensor: every method would fail on it later, with a worse message."""
    bad = first_non_finite(model)
    if bad is not None:
        raise UsageError(f"model '{path}' has NaN or Inf values in '{bad}'; the checkpoint is corrupt or diverged "
                         "in training: pass a model with finite weights")


def load_model(path, device="cpu", dtype=None, allow_pickle: bool = False) -> nn.Module:
    """Load a checkpoint (factored by subspace, or a plain dense one) as an eval-mode nn.Module.

    dtype: a torch.dtype, or None for the dtype stored in the checkpoint. Pickle weights (.bin)
    are refused unless `allow_pickle`. Bad or missing files raise UsageError naming the file.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"model directory '{path}' does not exist")
    check_device(str(device))
    _refuse_quantized(path, _read_json(path / "config.json"))
    files = _weight_files(path, allow_pickle)
    _check_safetensors(files)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot read the config in '{path}': {err}") from err
    cls = _model_class(path, config)

    kwargs = {"device_map": {"": torch.device(device)}, "use_safetensors": None if allow_pickle else True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = cls.from_pretrained(path, config=config, local_files_only=True,
                                          output_loading_info=True, **kwargs)
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"cannot load the weights in '{path}': {err}") from err
    except RuntimeError as err:
        if "mismatched" not in str(err):  # only shape mismatches are the checkpoint's fault
            raise
        raise UsageError(f"weights in '{path}' do not match the shapes its config.json declares "
                         "(see the load report above)") from err
    _check_loading_info(path, info)
    check_finite(model, path)
    if torch.device(device).type == "cuda":
        from subspace_cli.kernels.packed_product import use_packed_product
        from subspace_cli.modules.remote_modeling import DictionaryLinear

        for module in model.modules():  # each DictionaryLinear's packed product in Triton (no-op without triton)
            if isinstance(module, DictionaryLinear):
                use_packed_product(module)
    return model.eval()


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object | None
    path: Path
    ref: str


def load_model_and_tokenizer(
    ref: str, *, device: str = "cpu", dtype: str | None = "float32", allow_pickle: bool = False,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load any supported reference (safetensors only unless `allow_pickle`)."""
    path = resolve_model_path(ref)
    # One loader for factored and plain checkpoints: it refuses pickle unless allowed and names
    # corrupt or mismatched weight files; factored layers load without remote code.
    model = load_model(path, device=device, dtype=torch_dtype(dtype), allow_pickle=allow_pickle)
    model.eval()
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, ref=ref)
