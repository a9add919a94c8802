"""Modeling code shipped inside every factored checkpoint written by subspace.

This file is copied verbatim into the checkpoint as `modeling_subspace.py`, followed by one line
such as `SubspaceLlamaForCausalLM = build_model_class("LlamaForCausalLM")`, and config.json points
at that class through `auto_map`. So `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works without subspace installed.

Self-contained on purpose: it imports only the standard library, torch and transformers, never
subspace_cli. Keep it that way, and keep FORMAT_VERSION in step with docs/format.md.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F

# 1: low-rank modules. 2: adds sparse-dictionary modules. A checkpoint records the smallest
# version that describes it, so low-rank checkpoints stay readable by version-1 code.
FORMAT_VERSION = 2


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


def pack_bitmask(indices, atoms):
    """Atom ids [out, s] -> bitmask [out, ceil(atoms/8)] uint8, bit a of row o set when o uses atom a."""
    out = indices.shape[0]
    bits = torch.zeros(out, -(-atoms // 8) * 8, dtype=torch.uint8, device=indices.device)
    bits.scatter_(1, indices.long(), 1)
    weights = (1 << torch.arange(8, device=indices.device)).to(torch.uint8)
    return (bits.reshape(out, -1, 8) * weights).sum(-1, dtype=torch.uint8)


class DictionaryLinear(nn.Module):
    """y = (x·Dᵀ)·Sᵀ + b: a weight W [out, in] ~= S·D stored as a sparse dictionary code.

    `dictionary` D is [atoms, in], dense. S [out, atoms] has exactly `nonzeros` entries per row,
    stored packed: `values` [out, nonzeros] and their atom ids, either `indices` [out, nonzeros]
    (int16, or int32 past 32767 atoms) or `mask` [out, ceil(atoms/8)] uint8, whichever the
    writer found smaller; the values of a row follow ascending atom order. W is never formed.
    A module built with `shared_with` reads the dictionary of another DictionaryLinear (one
    dictionary for the same projection across several blocks) and stores none itself.
    """

    # kernel(z [N, atoms], values [out, s], indices [out, s]) -> [N, out]; None: the torch path.
    # subspace sets a Triton kernel here on CUDA; this file never imports it.
    kernel = None

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
        self._decoded = None  # (mask version key, int64 ids) cache for the bitmask form

    @classmethod
    def from_factors(cls, dictionary, values, indices, bias=None, positions="indices"):
        """Build from D [atoms, in], values [out, s], atom ids [out, s] and an optional bias [out]."""
        atoms, in_features = dictionary.shape
        out_features, nonzeros = values.shape
        if tuple(indices.shape) != (out_features, nonzeros):
            raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} differ in shape")
        order = indices.long().sort(dim=1)
        module = cls(in_features, out_features, atoms, nonzeros, bias=bias is not None, positions=positions,
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
        return module

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
        kernel = type(self).kernel  # read on the class: a plain function is not bound to self
        if kernel is not None and z.is_cuda:
            y = kernel(z.reshape(-1, self.atoms), self.values, self.atom_indices())
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            # S scattered to [out, atoms]: a transient the size of one [out, atoms] matrix, then one GEMM.
            y = F.linear(z, self.coefficients())
        return y if self.bias is None else y + self.bias

    def dense_weight(self):
        """The equivalent dense weight S·D, [out, in] (nn.Linear convention)."""
        return self.coefficients() @ self.dictionary_weight

    def extra_repr(self):
        shared = ", shared dictionary" if self._owner is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"nonzeros={self.nonzeros}, positions={self.positions}, bias={self.bias is not None}{shared}")


def _is_conv1d(module):
    # This file must stay self-contained (it is shipped in checkpoints), so it keeps its own copy
    # of subspace_cli.io.discovery.is_conv1d. GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D): weight stored as [in, out].
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


_BUILDERS = {"lowrank": _build_lowrank, "dictionary": _build_dictionary}


def apply_factored_layout(model, layout):
    """Replace each module named in `layout` by its factored form, in place; returns `model`.

    layout: {"dotted.module.path": {"kind": "lowrank", "rank": r, "in_features": i,
    "out_features": o, "bias": bool}} or {"kind": "dictionary", "atoms": k, "nonzeros": s,
    "positions": "indices" | "bitmask", "dictionary_of": owner path (shared dictionary, optional),
    ...}. The new module is created on the replaced weight's device and dtype; on the meta device
    (as in from_pretrained) nothing is allocated.
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

    name = "Subspace" + base_class_name
    # config_class is inherited from `base`, so Auto* registration (which compares config class
    # names) accepts the class for the checkpoint's native config.
    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    return cls
