"""PEFT LoRA on bare nn.Parameters (`target_parameters`, e.g. MoE expert stacks), read against a checkpoint.

PEFT 0.21 wraps each targeted parameter in a `ParamWrapper` (peft/tuners/lora/layer.py). For a
stack of E experts [E, out, in] (transformers 5: MixtralExperts.gate_up_proj [E, 2I, H]) it keeps

    lora_A.weight [E·r, in],  lora_B.weight [out, r·E]
    ΔW = scaling · einsum("o r e, e r i -> e o i", B.reshape(out, r, E), A.reshape(E, r, in))

(`e i o` for a module with `is_transposed`, whose stack is [E, in, out]; for a 2-D parameter,
E = 1 and ΔW = scaling · B @ A). Several parameters of one module are wrapped in nested wrappers,
in the module's registration order, the first innermost: the adapter's keys say `….experts.lora_A`
for the last and `….experts.base_layer.lora_A` for the one before, so which parameter a key pair
adapts comes from the architecture, not from the file. It is read here from a meta-device skeleton
of the base's architecture (config.json; no weights, no remote code).

The parameter is the in-memory one. A checkpoint may store it as it is (the same name and shape),
or in the layout transformers converts on load (Mixtral's per-expert w1 / w3 / w2 [I, H] tensors,
Qwen2-MoE's gate_proj / up_proj / down_proj): then ΔW is taken to that layout by transformers' own
reverse conversion (`revert_weight_conversion`, what `save_pretrained` writes), so the tensors
changed are exactly those PEFT's `merge_and_unload` + `save_pretrained` would change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from subspace_cli.errors import UsageError


@dataclass(frozen=True)
class ParamLora:
    """One wrapped parameter: its path in the model, its in-memory shape and PEFT's (in, out) orientation."""

    key: str  # e.g. "model.layers.0.mlp.experts.gate_up_proj"
    shape: tuple[int, ...]  # [E, out, in], [E, in, out] (transposed) or [out, in]
    transposed: bool  # [E, in, out] storage: PEFT does not swap in and out

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def in_out(self) -> tuple[int, int]:
        """(in, out) as PEFT's ParamWrapper reads them (`_get_in_out_features`, `update_layer`)."""
        if len(self.shape) == 2:
            return self.shape[1], self.shape[0]
        _, d1, d2 = self.shape
        return (d1, d2) if self.transposed else (d2, d1)


def param_delta(target: ParamLora, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW in the parameter's in-memory shape, float32, in the operation order of PEFT's
    ParamWrapper.get_delta_weight; a [E·r, in], b [out, r·E]."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    if target.experts == 1 and len(target.shape) == 2:
        return (b @ a) * scaling
    e = target.experts
    a = a.reshape(e, -1, a.shape[-1])  # [E, r, in]
    b = b.reshape(b.shape[0], -1, e)  # [out, r, E]
    pattern = "o r e, e r i -> e i o" if target.transposed else "o r e, e r i -> e o i"
    return torch.einsum(pattern, b, a) * scaling


class ParameterLayout:
    """The base architecture on the meta device: which parameter each nested ParamWrapper adapts, and
    where a parameter lives in the checkpoint."""

    def __init__(self, base_dir: Path, target_parameters: list[str], where: str):
        self.targets = sorted(set(target_parameters))
        self.where = where
        self.model = _skeleton(Path(base_dir), where)

    def _matches(self, key: str) -> bool:
        # PEFT's rule (BaseTuner._inject_parameters): the full key, or a suffix at a dot.
        return any(key == t or key.endswith(f".{t}") for t in self.targets)

    def wrapped(self, module_path: str) -> tuple[str, int] | None:
        """(unwrapped module path, depth) when `module_path` ('x.base_layer.base_layer') is a ParamWrapper
        of a module with targeted parameters; the key pair then adapts `wrapped_param(...)`."""
        parts = module_path.split(".")
        depth = 0
        while parts and parts[-1] == "base_layer":
            parts.pop()
            depth += 1
        if "base_layer" in parts:
            return None
        unwrapped = ".".join(parts)
        return (unwrapped, depth) if self.targeted_params(unwrapped) else None

    def targeted_params(self, module_path: str) -> list[str]:
        """The module's targeted parameters in registration order (PEFT wraps the first innermost)."""
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError:
            return []
        return [name for name, _ in module.named_parameters(recurse=False) if self._matches(f"{module_path}.{name}")]

    def wrapped_param(self, module_path: str, depth: int) -> ParamLora:
        names = self.targeted_params(module_path)
        if depth >= len(names):
            raise UsageError(f"{self.where}: '{module_path}' has {len(names)} targeted parameter(s) "
                             f"({', '.join(names)}) but the adapter nests {depth + 1} LoRA wrappers there")
        name = names[len(names) - 1 - depth]  # the outermost wrapper (depth 0) adapts the last one
        module = self.model.get_submodule(module_path)
        return ParamLora(f"{module_path}.{name}", tuple(getattr(module, name).shape),
                         bool(getattr(module, "is_transposed", False)))

    def checkpoint_layout(self, target: ParamLora) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors transformers writes for this parameter: {name: shape} (meta, no data)."""
        return {name: tuple(t.shape) for name, t in
                self.revert(target, torch.empty(target.shape, device="meta")).items()}

    def revert(self, target: ParamLora, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """`delta` (the parameter's in-memory shape) in the checkpoint's layout: {name: tensor}."""
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(self.model, {target.key: delta}))


def _skeleton(base_dir: Path, where: str):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base_dir)
    except (ValueError, OSError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"{where}: the adapter targets parameters (target_parameters), whose layout is read from the "
                         f"base's architecture, but '{base_dir}/config.json' cannot be read by transformers: {first}"
                         ) from err
    arch = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and re.fullmatch(r"\w+", arch) else None
    if cls is None:
        raise UsageError(f"{where}: the adapter targets parameters (target_parameters), whose layout is read from the "
                         f"base's architecture; transformers has no class '{arch}' (custom code is not run here): "
                         "merge the adapter first with PEFT's merge_and_unload")
    with torch.device("meta"):  # shapes and module structure only: nothing is allocated or initialised
        return cls(config)
