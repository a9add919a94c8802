"""Find the repeated blocks of a model and the Linear-like layers inside them, generically.

No per-architecture table: the blocks are the largest `nn.ModuleList` whose children share one
class and contain Linear (or GPT-2 `Conv1D`) layers. Works for Llama decoders, GPT-2 and BERT
encoders alike. Inside the blocks, mixture-of-experts experts are found by their shape and call
(3-D parameters [E, out, in], called with the routing), and the vocabulary matrices through
transformers' get_input_embeddings / get_output_embeddings.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.errors import UsageError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: y = x @ W + b with W stored as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the storage convention (a view, no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = weight_matrix(module)
    return w.shape[1], w.shape[0]


@dataclass
class Blocks:
    path: str  # dotted path of the ModuleList, e.g. "model.layers"
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def block_path(self, i: int) -> str:
        return f"{self.path}.{i}"


def find_blocks(model: nn.Module) -> Blocks:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear_like(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UsageError(
            f"found no repeated blocks with Linear layers in {type(model).__name__} ({_modules_seen(model)}); "
            "subspace supports models whose layers are an nn.ModuleList of same-class blocks holding nn.Linear "
            "(or GPT-2 Conv1D) layers"
        )
    return Blocks(path=best[1], modules=best[2])


def _first(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


def _modules_seen(model: nn.Module) -> str:
    """What find_blocks looked at, for its error: each ModuleList's block classes (and why they do
    not qualify), then the model's own children, e.g. `ModuleLists: encoder.stages = 2 × ResNetStage
    (no Linear); children: embedder: ResNetEmbeddings, encoder: ResNetEncoder`."""
    lists = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        classes = sorted({type(child).__name__ for child in module})
        why = "empty" if not classes else "mixed classes" if len(classes) > 1 else "no Linear"
        lists.append(f"{name or '(root)'} = {len(module)} × {'/'.join(classes) or '-'} ({why})")
    children = [f"{name}: {type(child).__name__}" for name, child in model.named_children()]
    return (f"ModuleLists: {_first(lists) if lists else 'none'}; "
            f"children: {_first(children) if children else 'none'}")


def block_linears(
    block: nn.Module, prefix: str, targets: str | None = None, exclude: str | None = None
) -> dict[str, nn.Module]:
    """Linear-like layers of one block as {full dotted path: module}, filtered by regexes."""
    found = {}
    for name, module in block.named_modules():
        if not is_linear_like(module):
            continue
        full = f"{prefix}.{name}"
        if targets and not re.search(targets, full):
            continue
        if exclude and re.search(exclude, full):
            continue
        found[full] = module
    return found


def linear_names(blocks: Blocks, index: int) -> list[str]:
    """The Linear layers of block `index` by their last two path components (mlp.down_proj, ...), for messages."""
    return sorted({p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1]
                   for p in block_linears(blocks.modules[index], blocks.block_path(index))})


def compile_pattern(pattern: str | None, flag: str) -> str | None:
    """Validate a user regex early so a typo fails with exit 2, not mid-run."""
    if pattern is None:
        return None
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{flag} '{pattern}' is not a valid regular expression: {exc}") from exc
    return pattern


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- MoE experts

# The experts layout subspace factors: transformers' `@use_experts_implementation` classes
# (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts, OlmoeExperts, ...) with these flags, whose
# eager forward is the loop LowRankExperts reproduces (modules/remote_modeling.py).
EXPERT_MATRICES = ("gate_up_proj", "down_proj")
_EXPERT_CALL = ("hidden_states", "top_k_index", "top_k_weights")
_EXPERT_FLAGS = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                 "has_post_expert_norm": False}


@dataclass
class ExpertSet:
    """One experts module: E experts whose weights are 3-D parameters [E, out, in]."""

    path: str  # dotted path, e.g. "model.layers.0.mlp.experts"
    module: nn.Module
    num_experts: int
    unsupported: str | None = None  # why subspace cannot factor it (copied unchanged), None if it can

    def matrix_name(self, param: str, expert: int) -> str:
        """The dotted name of one expert's matrix: `model.layers.0.mlp.experts.gate_up_proj.3`."""
        return f"{self.path}.{param}.{expert}"

    def weight(self, param: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s matrix [out, in] (a view): gate_up_proj [2I, H], down_proj [H, I]."""
        return getattr(self.module, param)[expert]


def _default_apply_gate():
    """transformers' default `act(gate) * up` gating (a class with its own `_apply_gate` gates differently)."""
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # a transformers without the experts interface: no class has `_apply_gate`
        return None
    return default


def _takes_routing(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # follows @wraps to the original
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == _EXPERT_CALL


def as_expert_set(module: nn.Module, path: str) -> ExpertSet | None:
    """An ExpertSet if `module` is an experts module (3-D parameters whose first dim is the number
    of experts, called with (hidden_states, top_k_index, top_k_weights)); None otherwise."""
    params = dict(module.named_parameters(recurse=False))
    cubes = [p for p in params.values() if p.dim() == 3]
    if not cubes or not _takes_routing(module):
        return None
    experts = cubes[0].shape[0]
    if any(p.shape[0] != experts for p in cubes):
        return None
    found = ExpertSet(path, module, experts)
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    flags = {k: getattr(module, k, v) for k, v in _EXPERT_FLAGS.items()}
    if (gate_up is None or down is None or set(params) != set(EXPERT_MATRICES) or flags != _EXPERT_FLAGS
            or gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2]
            or gate_up.shape[2] != down.shape[1] or not hasattr(module, "act_fn")
            or getattr(type(module), "_apply_gate", None) not in (None, _default_apply_gate())):
        shapes = {k: tuple(p.shape) for k, p in params.items()}
        found.unsupported = (f"{type(module).__name__} {shapes} is not the fused [E, 2I, H] gate_up_proj / [E, H, I] "
                             "down_proj layout (no biases, not transposed) that subspace factors")
    return found


def find_experts(block: nn.Module, prefix: str) -> list[ExpertSet]:
    """The experts modules inside one block (Mixtral's mlp.experts, Qwen2-MoE's mlp.experts, ...)."""
    found = []
    for name, module in block.named_modules():
        expert_set = as_expert_set(module, f"{prefix}.{name}" if name else prefix)
        if expert_set is not None:
            found.append(expert_set)
    return found


@dataclass(frozen=True)
class ExpertMatrix:
    """One expert's slice of one 3-D parameter, as a matrix [out, in] to factor."""

    experts: ExpertSet
    param: str  # "gate_up_proj" | "down_proj"
    index: int  # the expert

    @property
    def name(self) -> str:
        return self.experts.matrix_name(self.param, self.index)

    def weight(self) -> torch.Tensor:
        return self.experts.weight(self.param, self.index)


def block_experts(block: nn.Module, prefix: str, targets: str | None = None,
                  exclude: str | None = None) -> dict[str, ExpertMatrix]:
    """Factorable expert matrices of one block as {dotted name: ExpertMatrix}, filtered by the regexes
    (names such as `model.layers.0.mlp.experts.down_proj.3`); unsupported layouts are skipped."""
    found = {}
    for expert_set in find_experts(block, prefix):
        if expert_set.unsupported:
            continue
        for param in EXPERT_MATRICES:
            for e in range(expert_set.num_experts):
                matrix = ExpertMatrix(expert_set, param, e)
                if targets and not re.search(targets, matrix.name):
                    continue
                if exclude and re.search(exclude, matrix.name):
                    continue
                found[matrix.name] = matrix
    return found


def router_paths(block: nn.Module, prefix: str) -> set[str]:
    """Linear routers beside an experts module (a sibling Linear with one output per expert, as
    AFMoE's `gate`): never compressed, since routing decisions hinge on small logit differences."""
    routers = set()
    for name, module in block.named_modules():
        children = dict(module.named_children())
        sets = [as_expert_set(child, "") for child in children.values()]
        counts = {s.num_experts for s in sets if s is not None}
        for child_name, child in children.items():
            if is_linear_like(child) and in_out_features(child)[1] in counts:
                routers.add(".".join(p for p in (prefix, name, child_name) if p))
    return routers


# ----------------------------------------------------------------------------- embeddings

def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, m in model.named_modules() if m is target), None)


@dataclass
class VocabularyMatrices:
    """The input embedding [V, d] and the LM head (a Linear [V, d]) of a model, and whether they are tied."""

    embedding_path: str | None
    embedding: nn.Module | None
    head_path: str | None
    head: nn.Module | None
    tied: bool


def vocabulary_matrices(model: nn.Module) -> VocabularyMatrices:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if not isinstance(embedding, nn.Embedding):
        embedding = None
    if not isinstance(head, nn.Linear):
        head = None
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    return VocabularyMatrices(_module_path(model, embedding), embedding, _module_path(model, head), head, tied)


def embedding_scale(embedding: nn.Module) -> float | None:
    """The constant an embedding multiplies its rows by (Gemma 3's `*ScaledWordEmbedding`), None for a
    plain nn.Embedding. Raises UsageError for any other Embedding subclass: its forward is unknown."""
    if type(embedding) is nn.Embedding:
        scale = None
    elif type(embedding).__name__.endswith("ScaledWordEmbedding") and hasattr(embedding, "scalar_embed_scale"):
        scale = float(embedding.scalar_embed_scale)
    else:
        raise UsageError(f"the input embedding is a {type(embedding).__name__}, whose forward subspace does not know; "
                         "only nn.Embedding and scaled word embeddings can be factored: drop it from --targets")
    if embedding.max_norm is not None:
        raise UsageError("the input embedding renormalises rows (max_norm), which a low-rank embedding cannot "
                         "reproduce: drop it from --targets")
    return scale
