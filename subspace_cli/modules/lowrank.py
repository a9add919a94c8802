"""Factored modules (low-rank and sparse-dictionary) and helpers around the factored layout.

`LowRankLinear`, `DictionaryLinear`, `LowRankExperts`, `LowRankEmbedding` and `TiedLowRankLinear`
are defined in `remote_modeling.py` (that file is shipped inside every factored checkpoint, so
there is exactly one definition); they are re-exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from subspace_cli.walk import is_conv1d, set_submodule

from .remote_modeling import (
    FORMAT_VERSION,
    DictionaryLinear,
    GroupedLowRankLinear,
    LowRankEmbedding,
    LowRankExperts,
    LowRankGroup,
    LowRankLinear,
    TiedLowRankLinear,
    apply_factored_layout,
    existing_tied_keys,
)

__all__ = [
    "FACTORED_TYPES",
    "FORMAT_VERSION",
    "DictionaryLinear",
    "GroupedLowRankLinear",
    "LowRankEmbedding",
    "LowRankExperts",
    "LowRankGroup",
    "LowRankLinear",
    "TiedLowRankLinear",
    "apply_factored_layout",
    "densify_",
    "dictionary_from_factors",
    "factored_layout",
    "fuse_shared_inputs",
    "layout_format_version",
]

FACTORED_TYPES = (LowRankLinear, DictionaryLinear, LowRankExperts, LowRankEmbedding, TiedLowRankLinear,
                  LowRankGroup, GroupedLowRankLinear)
# Kinds a reader of the previous version does not know.
_VERSION_3_KINDS = ("lowrank_experts", "lowrank_embedding", "tied_lowrank")
_VERSION_4_KINDS = ("lowrank_group", "grouped_lowrank")


def pack_bitmask(indices, atoms):
    """Atom ids [out, s] -> bitmask [out, ceil(atoms/8)] uint8, bit a of row o set when o uses atom a."""
    out = indices.shape[0]
    bits = torch.zeros(out, -(-atoms // 8) * 8, dtype=torch.uint8, device=indices.device)
    bits.scatter_(1, indices.long(), 1)
    weights = (1 << torch.arange(8, device=indices.device)).to(torch.uint8)
    return (bits.reshape(out, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def dictionary_from_factors(dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                            bias: torch.Tensor | None = None, positions: str = "indices") -> DictionaryLinear:
    """A DictionaryLinear from D [atoms, in], values [out, s], atom ids [out, s] and an optional bias [out],
    positions stored as `indices` or a bit `mask`. Writer side: checkpoints load without it."""
    atoms, in_features = dictionary.shape
    out_features, nonzeros = values.shape
    if tuple(indices.shape) != (out_features, nonzeros):
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} differ in shape")
    order = indices.long().sort(dim=1)
    module = DictionaryLinear(in_features, out_features, atoms, nonzeros, bias=bias is not None, positions=positions,
                              dtype=dictionary.dtype, device=dictionary.device)
    with torch.no_grad():
        module.dictionary.copy_(dictionary)
        module.values.copy_(values.gather(1, order.indices).to(dictionary.dtype))
        if positions == "indices":
            module.indices.copy_(order.values)
        else:
            module.mask.copy_(pack_bitmask(order.values, atoms))
        if bias is not None:
            module.bias.copy_(bias.to(dictionary.dtype))
    # The run that builds it (compress, then its evaluation) keeps to the planned memory; a loaded
    # checkpoint chooses its inference form (docs/format.md).
    module.representation = "packed"
    return module


def fuse_shared_inputs(model: nn.Module, group: list[str]) -> str | None:
    """Stack the down factors of the LowRankLinear layers `group` (paths of layers fed the very same
    input tensor, e.g. q/k/v) into one LowRankGroup; each layer becomes a GroupedLowRankLinear
    reading its slice. The group is a new child of the layers' common parent, named after them
    (`self_attn.fused_q_proj_k_proj_v_proj`). Returns its path, or None when fewer than two of
    the layers are LowRankLinear (nothing to fuse). Same products, one GEMM instead of n.
    """
    members = [path for path in group if isinstance(model.get_submodule(path), LowRankLinear)]
    if len(members) < 2:
        return None
    parts = [path.split(".") for path in members]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    parent = ".".join(parts[0][:common])
    name = "fused_" + "_".join("_".join(p[common:]) for p in parts)
    layers = [model.get_submodule(path) for path in members]
    with torch.no_grad():
        down = torch.cat([m.down.weight for m in layers])  # [Σr, in]
        fused = LowRankGroup(layers[0].in_features, [m.rank for m in layers], dtype=down.dtype, device=down.device)
        fused.down.weight.copy_(down)
    set_submodule(model, f"{parent}.{name}" if parent else name, fused)
    for path, layer, offset in zip(members, layers, fused.offsets()):
        grouped = GroupedLowRankLinear(layer.in_features, layer.out_features, layer.rank, offset,
                                       bias=layer.up.bias is not None, dtype=down.dtype, device=down.device)
        grouped.up.load_state_dict(layer.up.state_dict())
        grouped.join(fused)
        set_submodule(model, path, grouped)
    return f"{parent}.{name}" if parent else name


def _module_spec(module: nn.Module, paths: dict[int, str]) -> dict:
    if isinstance(module, LowRankExperts):
        matrices = {}
        for name in LowRankExperts.MATRICES:
            in_f, out_f = module.shape(name)
            matrices[name] = {"in_features": in_f, "out_features": out_f, "ranks": module.ranks(name)}
        return {"kind": "lowrank_experts", "num_experts": module.num_experts, "matrices": matrices}
    if isinstance(module, LowRankEmbedding):
        spec = {"kind": "lowrank_embedding", "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim, "rank": module.rank}
        if module.scale is not None:
            spec["scale"] = module.scale
        if module.padding_idx is not None:
            spec["padding_idx"] = module.padding_idx
        return spec
    if isinstance(module, LowRankGroup):  # factored_layout fills in "members"
        return {"kind": "lowrank_group", "in_features": module.in_features, "ranks": module.ranks, "members": []}
    spec = {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, GroupedLowRankLinear):
        return {"kind": "grouped_lowrank", "rank": module.rank, "offset": module.offset, "bias": module.up.bias is not None,
                "group": paths[id(module._group[0])], **spec}
    if isinstance(module, TiedLowRankLinear):
        return {"kind": "tied_lowrank", "factors_of": paths[id(module._owner[0])], "bias": False, **spec}
    if isinstance(module, LowRankLinear):
        return {"kind": "lowrank", "rank": module.rank, "bias": module.up.bias is not None, **spec}
    spec = {"kind": "dictionary", "atoms": module.atoms, "nonzeros": module.nonzeros,
            "positions": module.positions, "bias": module.bias is not None, **spec}
    if module._owner is not None:
        spec["dictionary_of"] = paths[id(module._owner[0])]
    return spec


def _factored_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every factored module by path, less those inside a LowRankExperts (its entry describes them)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, FACTORED_TYPES) and not any(name.startswith(f"{p}.") for p, o in found.items()
                                                     if isinstance(o, LowRankExperts)):
            found[name] = m
    return found


def factored_layout(model: nn.Module) -> dict:
    """The layout dict describing every factored module in `model` (what config.json stores)."""
    found = _factored_modules(model)
    paths = {id(m): name for name, m in found.items()}
    layout = {name: _module_spec(m, paths) for name, m in found.items()}
    members = sorted((spec["group"], spec["offset"], name) for name, spec in layout.items()
                     if spec["kind"] == "grouped_lowrank")
    for group, _, name in members:
        layout[group]["members"].append(name)
    return layout


def layout_format_version(layout: dict) -> int:
    """The smallest checkpoint format version that describes `layout`: 1 for low-rank Linears only,
    2 with dictionaries, 3 with experts, embeddings or tied heads, 4 with fused down factors."""
    kinds = {spec["kind"] for spec in layout.values()}
    if kinds & set(_VERSION_4_KINDS):
        return 4
    if kinds & set(_VERSION_3_KINDS):
        return 3
    return 2 if "dictionary" in kinds else 1


def drop_stale_tied_keys(model: nn.Module) -> None:
    """After factoring a tied embedding, transformers must not look for `lm_head.weight` to tie
    (on save, or in `tie_weights`)."""
    if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = existing_tied_keys(model, model.all_tied_weights_keys)


def _transformers_base(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model")


def _dense_linear(lr: nn.Module, like: nn.Module, w: torch.Tensor) -> nn.Module:
    """The dense Linear (or GPT-2 Conv1D, weight [in, out]) with weight `w` [out, in]."""
    bias = lr.up.bias if isinstance(lr, (LowRankLinear, GroupedLowRankLinear)) else getattr(lr, "bias", None)
    if is_conv1d(like):
        with torch.device(w.device):
            dense = type(like)(lr.out_features, lr.in_features).to(w.dtype)  # weight [in, out]
        with torch.no_grad():
            dense.weight.copy_(w.T)
            if bias is not None:
                dense.bias.copy_(bias)
            else:
                dense.bias.zero_()
        return dense
    dense = nn.Linear(lr.in_features, lr.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def _dense_like(like: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The skeleton's own module (an experts module, an nn.Embedding subclass) materialised with `weights`."""
    first = next(iter(weights.values()))
    like.to_empty(device=first.device).to(first.dtype)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(like, name).copy_(w)
        if hasattr(like, "scalar_embed_scale") and isinstance(getattr(like, "embed_scale", None), torch.Tensor):
            like.embed_scale.fill_(like.scalar_embed_scale)  # a non-persistent buffer, left empty by to_empty
    return like


def densify_(model: nn.Module) -> nn.Module:
    """Replace every factored module by the dense module the architecture declares there, in place.

    The original module type (nn.Linear, GPT-2's Conv1D whose weight is stored [in, out], the
    experts module with its 3-D parameters, the embedding class) is read from a meta-device
    skeleton of the architecture, so the result is a plain checkpoint. A tied LM head becomes
    the Linear that shares the dense embedding's weight again.
    """
    found = _factored_modules(model)
    if not found:
        return model
    with torch.device("meta"):
        skeleton = _transformers_base(model)(model.config)
    # Dense weights first: a shared dictionary (or a tied embedding) must outlive every module that reads it.
    dense: dict[str, dict[str, torch.Tensor]] = {}
    for path, m in found.items():
        if isinstance(m, LowRankExperts):
            dense[path] = {name: m.dense_weight(name).detach() for name in LowRankExperts.MATRICES}
        elif not isinstance(m, (TiedLowRankLinear, LowRankGroup)):
            dense[path] = {"weight": m.dense_weight().detach()}  # [out, in] / [V, d]
    tied = {path: m._owner[0] for path, m in found.items() if isinstance(m, TiedLowRankLinear)}
    owners = {id(m): path for path, m in found.items()}
    for path, m in found.items():
        if isinstance(m, LowRankGroup):
            parent, _, child = path.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)  # its members become dense below
            continue
        like = skeleton.get_submodule(path)
        if isinstance(m, (LowRankExperts, LowRankEmbedding)):
            set_submodule(model, path, _dense_like(like, dense[path]))
        elif not isinstance(m, TiedLowRankLinear):
            set_submodule(model, path, _dense_linear(m, like, dense[path]["weight"]))
    for path, embedding in tied.items():
        shared = model.get_submodule(owners[id(embedding)]).weight  # the dense embedding's [V, d]
        head = nn.Linear(shared.shape[1], shared.shape[0], bias=False, device=shared.device, dtype=shared.dtype)
        head.weight = shared
        set_submodule(model, path, head)
    if tied and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return model
