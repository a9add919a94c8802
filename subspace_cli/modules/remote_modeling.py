"""Modeling code shipped inside every factored checkpoint written by subspace.

This file is copied verbatim into the checkpoint as `modeling_subspace.py`, followed by one line
such as `SubspaceLlamaForCausalLM = build_model_class("LlamaForCausalLM")`, and config.json points
at that class through `auto_map`. So `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works without subspace installed.

Self-contained on purpose: it imports only the standard library, torch and transformers, never
subspace_cli. Keep it that way, and keep FORMAT_VERSION in step with docs/format.md. It is one
file because it ships as one, hence longer than the package's other modules.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F

# 1: low-rank modules. 2: adds sparse-dictionary modules. 3: adds factored MoE experts, low-rank
# input embeddings and LM heads tied to them. A checkpoint records the smallest version that
# describes it, so low-rank checkpoints stay readable by version-1 code.
FORMAT_VERSION = 3


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-r factorisation of a Linear layer, W [out, in] ~= up.weight @ down.weight.

    down.weight is [rank, in], up.weight is [out, rank], the bias (if any) lives on `up`.
    Stores rank * (in + out) weights instead of in * out.
    """

    def __init__(self, in_features, out_features, rank, bias=True, dtype=None, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankLinear rank must be >= 1, got {rank}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        kw = {"dtype": dtype, "device": device}
        self.down = nn.Linear(self.in_features, self.rank, bias=False, **kw)  # weight [r, in]
        self.up = nn.Linear(self.rank, self.out_features, bias=bool(bias), **kw)  # weight [out, r]

    @classmethod
    def from_factors(cls, up_weight, down_weight, bias=None):
        """Build from up [out, r], down [r, in] and an optional bias [out]; the tensors are copied."""
        out_features, rank = up_weight.shape
        rank_d, in_features = down_weight.shape
        if rank != rank_d:
            raise ValueError(f"factor ranks differ: up is {tuple(up_weight.shape)}, down is {tuple(down_weight.shape)}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={out_features}")
        module = cls(in_features, out_features, rank, bias=bias is not None,
                     dtype=up_weight.dtype, device=up_weight.device)
        with torch.no_grad():
            module.up.weight.copy_(up_weight)
            module.down.weight.copy_(down_weight.to(up_weight.dtype))
            if bias is not None:
                module.up.bias.copy_(bias.to(up_weight.dtype))
        return module

    def forward(self, x):
        # (..., in) -> (..., r) -> (..., out)
        return self.up(self.down(x))

    def dense_weight(self):
        """The equivalent dense weight up @ down, [out, in] (nn.Linear convention)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")


def _unpack_bitmask(mask, atoms, nonzeros):
    """Bitmask [out, ceil(atoms/8)] uint8 (little bit order) -> sorted atom ids [out, nonzeros] int64."""
    bits = (mask.unsqueeze(-1) >> torch.arange(8, device=mask.device, dtype=torch.uint8)) & 1
    bits = bits.reshape(mask.shape[0], -1)[:, :atoms].bool()  # [out, atoms]
    if bool((bits.sum(1) != nonzeros).any()):
        raise ValueError(f"DictionaryLinear bitmask does not hold exactly {nonzeros} atoms per output")
    # Stable sort puts the set positions first, in ascending atom order.
    return torch.sort((~bits).to(torch.uint8), dim=1, stable=True).indices[:, :nonzeros]


def scatter_product(z, values, indices):
    """y = z·Sᵀ, S [out, atoms] scattered from values / atom ids [out, s]; z (..., atoms) -> (..., out).
    DictionaryLinear's default product: one transient [out, atoms] matrix, then one GEMM."""
    dense = torch.zeros(values.shape[0], z.shape[-1], dtype=values.dtype, device=values.device)
    return F.linear(z, dense.scatter_(1, indices.long(), values))


class DictionaryLinear(nn.Module):
    """y = (x·Dᵀ)·Sᵀ + b: a weight W [out, in] ~= S·D stored as a sparse dictionary code.

    `dictionary` D is [atoms, in], dense. S [out, atoms] has exactly `nonzeros` entries per row,
    stored packed: `values` [out, nonzeros] and their atom ids, either `indices` [out, nonzeros]
    (int16, or int32 past 32767 atoms) or `mask` [out, ceil(atoms/8)] uint8, whichever the
    writer found smaller; the values of a row follow ascending atom order. W is never formed.
    A module built with `shared_with` reads the dictionary of another DictionaryLinear (one
    dictionary for the same projection across several blocks) and stores none itself.
    """

    def __init__(self, in_features, out_features, atoms, nonzeros, bias=True, positions="indices",
                 dtype=None, device=None):
        super().__init__()
        if not 1 <= nonzeros <= atoms:
            raise ValueError(f"DictionaryLinear needs 1 <= nonzeros <= atoms, got {nonzeros} and {atoms}")
        if positions not in ("indices", "bitmask"):
            raise ValueError(f"DictionaryLinear positions must be 'indices' or 'bitmask', got {positions!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.atoms, self.nonzeros, self.positions = int(atoms), int(nonzeros), positions
        kw = {"dtype": dtype, "device": device}
        self.dictionary = nn.Parameter(torch.empty(self.atoms, self.in_features, **kw))
        self.values = nn.Parameter(torch.empty(self.out_features, self.nonzeros, **kw))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None
        if positions == "indices":
            index_dtype = torch.int16 if self.atoms <= 32767 else torch.int32
            self.register_buffer("indices", torch.zeros(self.out_features, self.nonzeros, dtype=index_dtype,
                                                        device=device))
        else:
            self.register_buffer("mask", torch.zeros(self.out_features, -(-self.atoms // 8), dtype=torch.uint8,
                                                     device=device))
        self._owner = None  # [DictionaryLinear] when the dictionary is shared (a list: not a submodule)
        # product(z [..., atoms], values [out, s], indices [out, s]) -> [..., out], per instance:
        # subspace's loader may set its Triton op here on CUDA (this file never imports it).
        self.product = scatter_product
        self._decoded = None  # (mask version key, int64 ids) cache for the bitmask form

    def share_dictionary(self, owner):
        """Use `owner`'s dictionary from now on; this module's own is dropped."""
        if (owner.atoms, owner.in_features) != (self.atoms, self.in_features):
            raise ValueError(f"shared dictionary is {owner.atoms}x{owner.in_features}, "
                             f"this module needs {self.atoms}x{self.in_features}")
        del self.dictionary
        self._owner = [owner]

    @property
    def dictionary_weight(self):
        return self._owner[0].dictionary if self._owner is not None else self.dictionary

    def atom_indices(self):
        """Atom ids [out, nonzeros]: the stored indices, or the bitmask decoded once and cached."""
        if self.positions == "indices":
            return self.indices
        key = (self.mask.data_ptr(), self.mask._version, self.mask.device)
        if self._decoded is None or self._decoded[0] != key:
            self._decoded = (key, _unpack_bitmask(self.mask, self.atoms, self.nonzeros))
        return self._decoded[1]

    def coefficients(self):
        """S as a dense [out, atoms] matrix (transient: the product needs only its packed form)."""
        dense = torch.zeros(self.out_features, self.atoms, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(1, self.atom_indices().long(), self.values)

    def forward(self, x):
        z = F.linear(x, self.dictionary_weight)  # (..., atoms)
        y = self.product(z, self.values, self.atom_indices())  # (..., out)
        return y if self.bias is None else y + self.bias

    def dense_weight(self):
        """The equivalent dense weight S·D, [out, in] (nn.Linear convention)."""
        return self.coefficients() @ self.dictionary_weight

    def extra_repr(self):
        shared = ", shared dictionary" if self._owner is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"nonzeros={self.nonzeros}, positions={self.positions}, bias={self.bias is not None}{shared}")


class LowRankExperts(nn.Module):
    """The factored form of a transformers experts module (MixtralExperts, Qwen2MoeExperts, ...: 3-D
    gate_up_proj [E, 2I, H] and down_proj [E, H, I], called with hidden_states [T, H], top_k_index
    [T, K] and top_k_weights [T, K]).

    Each expert's matrix is its own module: `lowrank.gate_up_proj[e]` and `lowrank.down_proj[e]` are
    a LowRankLinear (rank r_e) or, for an expert left dense, an nn.Linear without bias. forward is
    transformers' eager expert loop with every product taken through the expert's factors, so a
    token routed to e costs r_e·(in + out) multiply-adds per matrix instead of in·out, and the
    dense [E, out, in] weights are never formed (`dense_weight` builds them on request). It is a
    Python loop over the experts hit, like the eager path: not transformers' grouped_mm kernels.
    """

    MATRICES = ("gate_up_proj", "down_proj")

    def __init__(self, num_experts, matrices, act_fn, dtype=None, device=None):
        """matrices: {"gate_up_proj": (in, out, [rank or None per expert]), "down_proj": (...)}."""
        super().__init__()
        self.num_experts = int(num_experts)
        self.act_fn = act_fn
        kw = {"dtype": dtype, "device": device}
        self.lowrank = nn.ModuleDict()
        for name in self.MATRICES:
            in_f, out_f, ranks = matrices[name]
            if len(ranks) != self.num_experts:
                raise ValueError(f"LowRankExperts {name}: {len(ranks)} ranks for {self.num_experts} experts")
            self.lowrank[name] = nn.ModuleList(
                nn.Linear(in_f, out_f, bias=False, **kw) if r is None
                else LowRankLinear(in_f, out_f, r, bias=False, **kw) for r in ranks)

    def ranks(self, name):
        """Rank per expert of one matrix (None: stored dense)."""
        return [m.rank if isinstance(m, LowRankLinear) else None for m in self.lowrank[name]]

    def shape(self, name):
        """(in, out) of one expert's matrix."""
        first = self.lowrank[name][0]
        return first.in_features, first.out_features

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)  # (T, H)
        gate_up, down = self.lowrank["gate_up_proj"], self.lowrank["down_proj"]
        for e in torch.unique(top_k_index).tolist():  # the experts hit, ascending
            if not 0 <= e < self.num_experts:
                continue  # expert-parallel sentinels
            # (k, t) pairs in the order of transformers' one_hot(...).permute(2, 1, 0) mask
            top_k_pos, token_idx = torch.where(top_k_index.T == e)
            gate, up = gate_up[e](hidden_states[token_idx]).chunk(2, dim=-1)  # (n, I) each
            out = down[e](self.act_fn(gate) * up)  # (n, H)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def dense_weight(self, name):
        """The dense 3-D parameter [E, out, in] of matrix `name` (transient, for densifying)."""
        return torch.stack([m.dense_weight() if isinstance(m, LowRankLinear) else m.weight
                            for m in self.lowrank[name]])

    def extra_repr(self):
        return f"num_experts={self.num_experts}"


class LowRankEmbedding(nn.Module):
    """A rank-r input embedding: E [V, d] ~= up.weight [V, r] @ down.weight [r, d].

    A token's row is looked up in `up` and projected by `down`; r·(V + d) weights instead of V·d.
    `scale` (Gemma's scaled word embeddings) multiplies the result as the replaced module did.
    The factors follow LowRankLinear's convention for the LM head [V, d]: a head tied to this
    embedding computes up(down(x)) with the same two tensors (TiedLowRankLinear).
    """

    def __init__(self, num_embeddings, embedding_dim, rank, scale=None, padding_idx=None, dtype=None, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankEmbedding rank must be >= 1, got {rank}")
        self.num_embeddings, self.embedding_dim, self.rank = int(num_embeddings), int(embedding_dim), int(rank)
        self.scale = None if scale is None else float(scale)
        self.padding_idx = padding_idx  # informational: only training treats the padding row specially
        kw = {"dtype": dtype, "device": device}
        self.up = nn.Embedding(self.num_embeddings, self.rank, **kw)  # weight [V, r]
        self.down = nn.Linear(self.embedding_dim, self.rank, bias=False, **kw)  # weight [r, d]

    def forward(self, input_ids):
        out = self.up(input_ids) @ self.down.weight  # (..., r) @ [r, d] -> (..., d)
        if self.scale is not None:
            # as Gemma3TextScaledWordEmbedding: a float32 scalar cast to the weights' dtype
            out = out * torch.tensor(self.scale, dtype=torch.float32, device=out.device).to(out.dtype)
        return out

    def dense_weight(self):
        """The dense embedding [V, d]."""
        return self.up.weight @ self.down.weight

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}"
                + (f", scale={self.scale:g}" if self.scale is not None else ""))


class TiedLowRankLinear(nn.Module):
    """An LM head tied to a LowRankEmbedding: logits = x @ Eᵀ = up(down(x)) with the embedding's own
    factors. It stores nothing itself, as a tied lm_head stores nothing in transformers."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._owner = None  # [LowRankEmbedding] (a list: not a submodule, its tensors are saved once)

    def tie_to(self, embedding):
        if (embedding.embedding_dim, embedding.num_embeddings) != (self.in_features, self.out_features):
            raise ValueError(f"tied head is {self.in_features}->{self.out_features}, the embedding is "
                             f"{embedding.num_embeddings}x{embedding.embedding_dim}")
        self._owner = [embedding]

    def forward(self, x):
        if self._owner is None:
            raise RuntimeError("TiedLowRankLinear is not tied to an embedding")
        embedding = self._owner[0]
        # (..., d) -> (..., r) -> (..., V)
        return F.linear(F.linear(x, embedding.down.weight), embedding.up.weight)

    def dense_weight(self):
        return self._owner[0].dense_weight()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, tied"


def _is_conv1d(module):
    # This file must stay self-contained (it is shipped in checkpoints), so it keeps its own copy
    # of subspace_cli.walk.is_conv1d. GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D): weight stored as [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _dense_shape(module):
    """(in_features, out_features) of a nn.Linear or Conv1D, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.nx, module.nf
    return None


def _checked_shape(path, spec, old):
    """(in, out) the layout declares for `path`, after checking the module it replaces."""
    shape = _dense_shape(old)
    if shape is None:
        raise ValueError(f"subspace layout: module '{path}' is a {type(old).__name__}; "
                         "only nn.Linear and Conv1D modules can be factored")
    want = (int(spec["in_features"]), int(spec["out_features"]))
    if shape != want:
        raise ValueError(f"subspace layout: module '{path}' has (in, out) = {shape}, layout says {want}")
    return want


def _build_lowrank(path, spec, old):
    if isinstance(old, LowRankLinear) and old.rank == spec["rank"]:
        return None  # already factored (layout applied twice)
    in_f, out_f = _checked_shape(path, spec, old)
    weight = old.weight
    return LowRankLinear(in_f, out_f, int(spec["rank"]), bias=bool(spec.get("bias", True)),
                         dtype=weight.dtype, device=weight.device)


def _build_dictionary(path, spec, old):
    if isinstance(old, DictionaryLinear) and (old.atoms, old.nonzeros) == (spec["atoms"], spec["nonzeros"]):
        return None
    in_f, out_f = _checked_shape(path, spec, old)
    weight = old.weight
    return DictionaryLinear(in_f, out_f, int(spec["atoms"]), int(spec["nonzeros"]),
                            bias=bool(spec.get("bias", True)), positions=spec.get("positions", "indices"),
                            dtype=weight.dtype, device=weight.device)


def _build_experts(path, spec, old):
    num_experts = int(spec["num_experts"])
    matrices = {}
    for name in LowRankExperts.MATRICES:
        entry = spec["matrices"][name]
        in_f, out_f = int(entry["in_features"]), int(entry["out_features"])
        ranks = [None if r is None else int(r) for r in entry["ranks"]]
        matrices[name] = (in_f, out_f, ranks)
        if isinstance(old, LowRankExperts):
            continue
        param = getattr(old, name, None)
        if not isinstance(param, torch.Tensor) or tuple(param.shape) != (num_experts, out_f, in_f):
            raise ValueError(f"subspace layout: '{path}.{name}' is not a [{num_experts}, {out_f}, {in_f}] expert "
                             f"parameter in {type(old).__name__}")
    if isinstance(old, LowRankExperts):
        if all(old.ranks(n) == matrices[n][2] for n in LowRankExperts.MATRICES):
            return None
        act_fn, like = old.act_fn, old.lowrank["gate_up_proj"][0]
        weight = like.up.weight if isinstance(like, LowRankLinear) else like.weight
    else:
        act_fn, weight = old.act_fn, old.gate_up_proj
    return LowRankExperts(num_experts, matrices, act_fn, dtype=weight.dtype, device=weight.device)


def _build_embedding(path, spec, old):
    shape = (int(spec["num_embeddings"]), int(spec["embedding_dim"]))
    if isinstance(old, LowRankEmbedding):
        if (old.num_embeddings, old.embedding_dim, old.rank) == (*shape, spec["rank"]):
            return None
        weight = old.up.weight
    elif isinstance(old, nn.Embedding) and tuple(old.weight.shape) == shape:
        weight = old.weight
    else:
        raise ValueError(f"subspace layout: module '{path}' is a {type(old).__name__}, layout says an "
                         f"embedding {shape[0]}x{shape[1]}")
    return LowRankEmbedding(*shape, int(spec["rank"]), scale=spec.get("scale"), padding_idx=spec.get("padding_idx"),
                            dtype=weight.dtype, device=weight.device)


def _build_tied(path, spec, old):
    if isinstance(old, TiedLowRankLinear):
        return None
    in_f, out_f = _checked_shape(path, spec, old)
    return TiedLowRankLinear(in_f, out_f)


_BUILDERS = {"lowrank": _build_lowrank, "dictionary": _build_dictionary, "lowrank_experts": _build_experts,
             "lowrank_embedding": _build_embedding, "tied_lowrank": _build_tied}


def existing_tied_keys(model, keys):
    """`keys` ({tied target: source}, transformers' form) less the pairs whose tensors a factored
    module replaced: transformers would otherwise look for `lm_head.weight` to tie and fail."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {target: source for target, source in keys.items() if target in names and source in names}


def apply_factored_layout(model, layout):
    """Replace each module named in `layout` by its factored form, in place; returns `model`.

    layout: {"dotted.module.path": {"kind": "lowrank", "rank": r, "in_features": i,
    "out_features": o, "bias": bool}} or {"kind": "dictionary", "atoms": k, "nonzeros": s,
    "positions": "indices" | "bitmask", "dictionary_of": owner path (shared dictionary, optional),
    ...}; version 3 adds "lowrank_experts", "lowrank_embedding" and "tied_lowrank" (docs/format.md).
    The new module is created on the replaced weight's device and dtype; on the meta device (as in
    from_pretrained) nothing is allocated.
    """
    for path, spec in layout.items():
        kind = spec.get("kind")
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise ValueError(
                f"subspace layout: module '{path}' has unknown kind {kind!r}; this modeling code "
                f"(checkpoint format version {FORMAT_VERSION}) knows {sorted(_BUILDERS)}")
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError as err:
            raise ValueError(f"subspace layout: module '{path}' does not exist in "
                             f"{type(model).__name__}") from err
        new = builder(path, spec, old)
        if new is not None:
            setattr(parent, child, new)
    for path, spec in layout.items():
        owner = spec.get("dictionary_of")
        if owner is not None:
            module = model.get_submodule(path)
            if module._owner is None:
                module.share_dictionary(model.get_submodule(owner))
        if spec.get("kind") == "tied_lowrank":
            model.get_submodule(path).tie_to(model.get_submodule(spec["factors_of"]))
    if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = existing_tied_keys(model, model.all_tied_weights_keys)
    return model


def _check_section(section):
    if not isinstance(section, dict) or section.get("kind") != "factored":
        raise ValueError("config.subspace is missing or is not a factored-checkpoint section")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {version!r} is not supported by this modeling code "
                         f"(supports <= {FORMAT_VERSION})")


def build_model_class(base_class_name):
    """A subclass of transformers.<base_class_name> whose __init__ applies config.subspace's layout."""
    base = getattr(transformers, base_class_name)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        section = getattr(config, "subspace", None)
        _check_section(section)
        apply_factored_layout(self, section["modules"])

    def get_expanded_tied_weights_keys(self, all_submodels=False):
        # A tied embedding factored once (TiedLowRankLinear) has no `lm_head.weight` left to tie.
        return existing_tied_keys(self, base.get_expanded_tied_weights_keys(self, all_submodels=all_submodels))

    name = "Subspace" + base_class_name
    # config_class is inherited from `base`, so Auto* registration (which compares config class
    # names) accepts the class for the checkpoint's native config.
    attrs = {"__init__": __init__, "__module__": __name__, "__qualname__": name}
    if hasattr(base, "get_expanded_tied_weights_keys"):  # transformers >= 5
        attrs["get_expanded_tied_weights_keys"] = get_expanded_tied_weights_keys
    cls = type(name, (base,), attrs)
    return cls
