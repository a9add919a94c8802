"""A base checkpoint plus a PEFT LoRA adapter, read as the merged checkpoint one tensor at a time.

  LoraCheckpoint   get(name) = base + scaling * B @ A per targeted weight (or the adapter's full
                   replacement for modules_to_save), computed on demand in float32.
  is_lora_adapter  whether a directory holds a PEFT adapter.

Only plain LoRA merges this way; variants whose merge is not base + scaling * B @ A (DoRA, QA-LoRA,
...) are refused with what to do instead. PEFT is not needed at run time. LoRA on bare parameters
(`target_parameters`, e.g. MoE expert stacks [E, out, in]) is applied per expert slice, in the
checkpoint's own layout (io/lora_parameters.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.lazy_checkpoint import LazyCheckpoint, PickleFile, _read_json
from subspace_cli.io.lora_parameters import ParameterLayout, ParamLora, param_delta
from subspace_cli.io.safetensors_file import SafetensorsFile

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


# LoraConfig fields that select a LoRA variant (or layout) whose merge is not base + scaling * B @ A.
# Listed by hand so PEFT is not needed at run time; the value is what the user should do instead.
_REFUSED_FIELDS = {
    "use_dora": "merge it first with `subspace adapt --merge` or PEFT's merge_and_unload, and merge the result",
    "use_qalora": "QA-LoRA pools its inputs; merge it first with PEFT's merge_and_unload",
    "use_bdlora": "block-diagonal LoRA is not supported; merge it first with PEFT's merge_and_unload",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens and cannot be merged",
    "arrow_config": "Arrow routes between adapters per token and cannot be merged into weights",
    "kasa_config": "KaSA is not supported; merge it first with PEFT's merge_and_unload",
    "monteclora_config": "MonteCLoRA is not supported; merge it first with PEFT's merge_and_unload",
    "velora_config": "VeLoRA is not supported; merge it first with PEFT's merge_and_unload",
    "layer_replication": "replicated layers change the architecture; merge it first with PEFT's merge_and_unload",
    "trainable_token_indices": "trainable tokens are not supported; merge it first with PEFT's merge_and_unload",
}
# init_lora_weights values that change the base weights: the adapter only fits the residual model.
_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def is_lora_adapter(path: Path) -> bool:
    """True for a directory holding a PEFT adapter (adapter_config.json)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key), copied exactly:
    the first key that, as a regex, matches a whole dotted suffix of the module name wins."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


@dataclass(frozen=True)
class _LoraTerm:
    """One low-rank update of a base tensor: scaling * B @ A (kind 'linear', 'embedding') or
    scaling * lora_B.bias (kind 'bias')."""

    kind: str
    a_key: str | None
    b_key: str
    scaling: float
    transpose: bool = False
    param: str | None = None  # kind 'param': the wrapped parameter's path in the model


@dataclass(frozen=True)
class _ParamPlan:
    """A LoRA on one bare parameter (PEFT's ParamWrapper) and the checkpoint tensors it changes."""

    target: ParamLora
    a_key: str
    b_key: str
    scaling: float
    names: dict[str, str]  # name in transformers' checkpoint layout -> the base's name (the same, or
    #                        without a leading component, as _base_name resolves); {key: name} when stored as is


class LoraCheckpoint:
    """A base checkpoint with a PEFT LoRA adapter applied, read one tensor at a time.

    `get(name)` = base (or the adapter's full replacement, for modules_to_save / trained biases)
    + scaling * B @ A for targeted weights, computed in float32 and returned in the base dtype.
    Everything is checked from shapes when constructed, so a bad adapter fails before any work.
    `close()` closes the adapter file only: the base may be shared by several adapters.
    Pickle adapter weights (adapter_model.bin) are read only with `allow_pickle`.
    """

    def __init__(self, base: LazyCheckpoint, adapter_dir: Path, allow_pickle: bool = False):
        self.base = base
        self.adapter_dir = Path(adapter_dir)
        self.adapter_config = self._read_config()
        weights = self.adapter_dir / ADAPTER_WEIGHTS
        self._handle: SafetensorsFile | PickleFile | None = None
        if weights.is_file():
            self._handle = SafetensorsFile(weights)
        elif (self.adapter_dir / ADAPTER_PICKLE).is_file():
            if not allow_pickle:
                raise UsageError(
                    f"adapter '{self.adapter_dir}' only has pickle weights ({ADAPTER_PICKLE}), which can run code "
                    "when loaded; pass --allow-pickle if you trust its source, or convert it once (load it with "
                    "PeftModel.from_pretrained and save it with save_pretrained(new_dir, safe_serialization=True))")
            self._handle = PickleFile(self.adapter_dir / ADAPTER_PICKLE)
        else:
            raise UsageError(f"adapter '{self.adapter_dir}' has no {ADAPTER_WEIGHTS}")
        self._replace: dict[str, str] = {}  # base name -> adapter key of its full replacement
        self._terms: dict[str, list[_LoraTerm]] = {}  # base name -> its LoRA updates
        self._layout: ParameterLayout | None = None  # the base's architecture, for target_parameters only
        self._params: dict[str, _ParamPlan] = {}  # parameter path -> its plan
        # Deltas of a parameter stored as several tensors (per-expert w1/w3/w2), computed once and handed out
        # as each tensor is read: in checkpoint order, one layer's expert deltas (float32) are held at a time.
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        try:
            self._plan()
        except BaseException:
            self.close()
            raise

    # -- configuration

    def _read_config(self) -> dict:
        file = self.adapter_dir / ADAPTER_CONFIG
        if not file.is_file():
            raise UsageError(f"'{self.adapter_dir}' is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        cfg = _read_json(file)
        if not isinstance(cfg, dict):
            raise UsageError(f"'{file}' is not a JSON object")
        peft_type = str(cfg.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise UsageError(f"'{file}': peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters "
                             "(peft_type 'LORA') can be merged")
        for field, advice in _REFUSED_FIELDS.items():
            if cfg.get(field):
                raise UsageError(f"'{file}': {field}: {json.dumps(cfg[field])} is not supported here; {advice}")
        init = str(cfg.get("init_lora_weights", True)).lower()
        if init == "mica":
            raise UsageError(f"'{file}': init_lora_weights 'mica' is a LoRA variant that is not supported here; "
                             "merge it first with PEFT's merge_and_unload")
        if init.startswith(_MUTATING_INITS):
            log.warning("adapter '%s' was initialised with init_lora_weights=%r, which changes the base weights; "
                        "the result is only right if the base given is the residual model it was trained on",
                        self.adapter_dir, cfg.get("init_lora_weights"))
        for field in ("r", "lora_alpha"):
            if not isinstance(cfg.get(field), (int, float)) or isinstance(cfg.get(field), bool) or cfg[field] <= 0:
                raise UsageError(f"'{file}': {field} must be a positive number, got {cfg.get(field)!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(cfg.get(field) or {}, dict):
                raise UsageError(f"'{file}': {field} must be a mapping, got {cfg.get(field)!r}")
        params = cfg.get("target_parameters") or []
        if not isinstance(params, list) or not all(isinstance(p, str) and p for p in params):
            raise UsageError(f"'{file}': target_parameters must be a list of parameter names, got {params!r}")
        return cfg

    def _scaling(self, module: str) -> tuple[int, float]:
        """(r, scaling) for one module, as PEFT's LoraModel._create_and_replace computes them."""
        cfg = self.adapter_config
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        try:
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg["r"])
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
        except re.error as err:
            raise UsageError(f"'{self.adapter_dir / ADAPTER_CONFIG}': a rank_pattern / alpha_pattern key is not a "
                             f"valid regular expression: {err}") from err
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return int(r), float(scaling)

    # -- key mapping, all from headers

    def _adapter_shape(self, key: str) -> tuple[int, ...]:
        return self._handle.shape(key)

    def _base_name(self, name: str) -> str | None:
        """The base tensor an adapter-side name refers to, or None. PEFT names follow the module tree,
        which can have one more leading component than the checkpoint's names (GPT-2 hub files store
        'h.0...' where the model, and so the adapter, says 'transformer.h.0...')."""
        if name in self.base:
            return name
        _, _, rest = name.partition(".")
        if rest and rest in self.base:
            return rest
        return None

    def _require_base(self, name: str, key: str) -> str:
        resolved = self._base_name(name)
        if resolved is None:
            raise UsageError(f"adapter '{self.adapter_dir}': '{key}' targets '{name}', which is not in the base "
                             f"model '{self.base.path}'; was the adapter trained on a different base?")
        return resolved

    def _plan(self) -> None:
        keys = sorted(self._handle.keys())
        lora: dict[str, dict[str, str]] = {}  # module path -> {"A": key, "B": key, "bias": key, "emb_A": ...}
        for key in keys:
            path = key.removeprefix(PEFT_PREFIX)
            parts = path.split(".")
            if "lora_magnitude_vector" in parts:
                raise UsageError(f"adapter '{self.adapter_dir}' holds DoRA magnitudes ('{key}'): use_dora is not "
                                 "supported; merge it first with `subspace adapt --merge` or PEFT's "
                                 "merge_and_unload, and merge the result")
            if "trainable_tokens_delta" in parts:
                raise UsageError(f"adapter '{self.adapter_dir}' holds trainable tokens ('{key}'), which are not "
                                 "supported; merge it first with PEFT's merge_and_unload")
            for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
                                 (".lora_embedding_A", "emb_A"), (".lora_embedding_B", "emb_B")):
                if path.endswith(suffix):
                    lora.setdefault(path[: -len(suffix)], {})[slot] = key
                    break
            else:
                if any(p.startswith("lora_") for p in parts):
                    raise UsageError(f"adapter '{self.adapter_dir}': unrecognised LoRA tensor '{key}' (only plain "
                                     "LoRA on Linear, GPT-2 Conv1D and Embedding layers is supported)")
                self._plan_replacement(key, parts)
        for module, slots in lora.items():
            if not self._plan_param(module, slots):
                self._plan_lora(module, slots)

    def _plan_replacement(self, key: str, parts: list[str]) -> None:
        """A full tensor in the adapter (modules_to_save, bias='all'/'lora_only', saved embeddings)
        replaces the base tensor. PEFT saves it under the module path without the 'modules_to_save.<adapter>'
        wrapper (handled too, in case an exporter kept it), and a targeted layer's own tensors with an
        extra 'base_layer.' (e.g. '...c_attn.base_layer.bias')."""
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            candidates = [parts[:i] + parts[i + 1:], parts[:i] + parts[i + 2:]]
        else:
            candidates = [parts]
        candidates = [[p for p in c if p != "base_layer"] for c in candidates]
        for cand in candidates:
            resolved = self._base_name(".".join(cand))
            if resolved is not None:
                self._replace[resolved] = key
                return
        self._require_base(".".join(candidates[0]), key)  # raises, naming the tensor

    def _plan_param(self, module: str, slots: dict[str, str]) -> bool:
        """Plan a ParamWrapper's pair (True), or leave `module` to _plan_lora (False: no target_parameters,
        or a module none of whose parameters is targeted)."""
        targets = self.adapter_config.get("target_parameters")
        if not targets:
            return False
        where = f"adapter '{self.adapter_dir}'"
        if self._layout is None:
            self._layout = ParameterLayout(self.base.path, targets, where)
        found = self._layout.wrapped(module)
        if found is None:
            return False
        target = self._layout.wrapped_param(*found)
        if "A" not in slots or "B" not in slots or set(slots) - {"A", "B"}:
            odd = slots.get("A") or slots.get("B") or next(iter(slots.values()))
            raise UsageError(f"{where}: '{odd}' is not a lora_A / lora_B pair of the parameter '{target.key}' (PEFT's "
                             "LoRA on parameters has no bias or embedding factors)")
        r, scaling = self._scaling(target.key)  # PEFT matches rank_pattern against the parameter's path
        a_shape, b_shape = self._adapter_shape(slots["A"]), self._adapter_shape(slots["B"])
        in_f, out_f = target.in_out
        want_a, want_b = (r * target.experts, in_f), (out_f, r * target.experts)
        if a_shape != want_a or b_shape != want_b:
            raise UsageError(f"{where}: '{slots['A']}' {a_shape} / '{slots['B']}' {b_shape} do not fit the parameter "
                             f"'{target.key}' {target.shape} at rank {r} (expected {want_a} / {want_b})")
        direct = self._base_name(target.key)
        if direct is not None and self.base.shape(direct) == target.shape:
            names = {target.key: direct}
        else:
            names = {}
            for name, shape in self._layout.checkpoint_layout(target).items():
                resolved = self._base_name(name)
                if resolved is None or self.base.shape(resolved) != shape:
                    raise UsageError(f"{where}: it adapts the parameter '{target.key}' {target.shape}, which the base "
                                     f"'{self.base.path}' stores neither as such nor as transformers converts it "
                                     f"('{name}' {shape} is {'missing' if resolved is None else 'another shape'}); "
                                     "was the adapter trained on a different base?")
                names[name] = resolved
        self._params[target.key] = _ParamPlan(target, slots["A"], slots["B"], scaling, names)
        for name in names.values():
            self._terms.setdefault(name, []).append(_LoraTerm("param", slots["A"], slots["B"], scaling,
                                                              param=target.key))
        return True

    def _plan_lora(self, module: str, slots: dict[str, str]) -> None:
        r_cfg, scaling = self._scaling(module)
        if "emb_A" in slots or "emb_B" in slots:
            if "emb_A" not in slots or "emb_B" not in slots:
                raise UsageError(f"adapter '{self.adapter_dir}': '{slots.get('emb_A') or slots.get('emb_B')}' has "
                                 "no matching lora_embedding_A/lora_embedding_B partner")
            a_key, b_key, kind = slots["emb_A"], slots["emb_B"], "embedding"
        else:
            if "A" not in slots or "B" not in slots:
                lonely = slots.get("A") or slots.get("B") or slots.get("bias")
                raise UsageError(f"adapter '{self.adapter_dir}': '{lonely}' has no matching lora_A/lora_B partner")
            a_key, b_key, kind = slots["A"], slots["B"], "linear"
        target = self._require_base(f"{module}.weight", b_key)
        a_shape, b_shape = self._adapter_shape(a_key), self._adapter_shape(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise UsageError(f"adapter '{self.adapter_dir}': '{a_key}' {a_shape} and '{b_key}' {b_shape} are not "
                             "a LoRA pair (A is r x in, B is out x r)")
        rank = a_shape[0]
        if rank != r_cfg:
            raise UsageError(f"adapter '{self.adapter_dir}': '{a_key}' has rank {rank} but adapter_config.json "
                             f"(r / rank_pattern) gives {r_cfg} for module '{module}'")
        shape = self.shape(target)
        if len(shape) != 2:
            raise UsageError(f"adapter '{self.adapter_dir}': '{a_key}' targets '{target}' of shape {shape}; LoRA on "
                             "convolution or other non-2-D layers is not supported")
        if kind == "embedding":
            # lora_embedding_A is r x num_embeddings, lora_embedding_B is dim x r: delta = (B @ A)^T.
            if shape != (a_shape[1], b_shape[0]):
                raise UsageError(f"adapter '{self.adapter_dir}': '{a_key}' {a_shape} / '{b_key}' {b_shape} do not "
                                 f"fit '{target}' of shape {shape}")
            transpose = True
        else:
            straight, flipped = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
            if shape == straight == flipped:
                # Square: the shapes cannot tell a Linear from a GPT-2 Conv1D; trust the config.
                transpose = bool(self.adapter_config.get("fan_in_fan_out"))
            elif shape == straight:
                transpose = False
            elif shape == flipped:
                # Conv1D stores (in, out). PEFT flips config.fan_in_fan_out per layer type as it goes,
                # so for mixed Linear/Conv1D targets the saved flag is only right for some layers.
                transpose = True
            else:
                raise UsageError(f"adapter '{self.adapter_dir}': '{a_key}' {a_shape} / '{b_key}' {b_shape} do not "
                                 f"fit '{target}' of shape {shape}")
        self._terms.setdefault(target, []).append(_LoraTerm(kind, a_key, b_key, scaling, transpose))
        if "bias" in slots:
            bias = self._require_base(f"{module}.bias", slots["bias"])
            if self.shape(bias) != (b_shape[0],):
                raise UsageError(f"adapter '{self.adapter_dir}': '{slots['bias']}' does not fit '{bias}' of shape "
                                 f"{self.shape(bias)}")
            self._terms.setdefault(bias, []).append(_LoraTerm("bias", None, slots["bias"], scaling))

    # -- the checkpoint interface

    def names(self) -> list[str]:
        """The base's names, in the base's (sorted) order."""
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        """The base shape, or the replacement's when the adapter saved a full tensor (e.g. a resized vocabulary)."""
        if name in self._replace:
            return self._adapter_shape(self._replace[name])
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Always the base tensor's dtype: that is what `get` returns."""
        return self.base.dtype(name)

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def trained_on(self) -> str | None:
        """adapter_config.json's base_model_name_or_path: the base the adapter was trained on, as PEFT
        recorded it (a path, a hub id or builtin:NAME), or None when it names none."""
        ref = self.adapter_config.get("base_model_name_or_path")
        return ref if isinstance(ref, str) and ref.strip() else None

    @property
    def targeted(self) -> list[str]:
        """Base tensors the adapter changes (LoRA updates or full replacements), sorted."""
        return sorted(set(self._terms) | set(self._replace))

    def get(self, name: str) -> torch.Tensor:
        dtype = self.base.dtype(name)
        if name in self._replace:
            tensor = self._handle.read(self._replace[name])  # a fresh tensor, owned here
        else:
            tensor = self.base.get(name)
        terms = self._terms.get(name)
        if not terms:
            return tensor.to(dtype)
        out = tensor.to(torch.float32)  # owned either way, so it can be updated in place
        del tensor
        for term in terms:
            out += self._param_delta(term.param, name) if term.kind == "param" else self._delta(term)
        return out.to(dtype)

    def _param_delta(self, key: str, name: str) -> torch.Tensor:
        """ΔW of the base tensor `name` from the LoRA on the parameter `key`, float32."""
        plan = self._params[key]
        pending = self._pending.get(key)
        if pending is None or name not in pending:
            delta = param_delta(plan.target, self._handle.read(plan.a_key), self._handle.read(plan.b_key), plan.scaling)
            if list(plan.names) == [key]:  # stored as the model holds it
                return delta
            pending = {plan.names[n]: t for n, t in self._layout.revert(plan.target, delta).items()}
            del delta
            self._pending[key] = pending
        out = pending.pop(name)
        if not pending:
            del self._pending[key]
        return out

    def _delta(self, term: _LoraTerm) -> torch.Tensor:
        # Same operation order as PEFT's get_delta_weight, in float32.
        b = self._handle.read(term.b_key).to(torch.float32)
        if term.kind == "bias":
            return b * term.scaling
        a = self._handle.read(term.a_key).to(torch.float32)
        delta = b @ a
        if term.transpose:
            delta = delta.T
        return delta * term.scaling

    def close(self) -> None:
        """Close the adapter file; the base stays open (it may be shared)."""
        self._pending.clear()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraCheckpoint(base='{self.base.path}', adapter='{self.adapter_dir}')"
