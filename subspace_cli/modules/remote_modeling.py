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

import os
import time
import weakref

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module_state

# 1: low-rank modules. 2: adds sparse-dictionary modules. 3: adds factored MoE experts, low-rank
# input embeddings and LM heads tied to them. 4: adds fused down factors of layers fed the same
# input (lowrank_group / grouped_lowrank). A checkpoint records the smallest version that
# describes it, so low-rank checkpoints stay readable by version-1 code.
FORMAT_VERSION = 4


def _plain(linear):
    """True for an nn.Linear that nothing wraps or hooks (PEFT, accelerate, calibration hooks): its
    product may be taken with F.linear directly."""
    return (type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks
            and "forward" not in linear.__dict__ and not _module_state._global_forward_hooks
            and not _module_state._global_forward_pre_hooks)


def _linear(module, x):
    # At batch-1 decode a factored layer's cost is mostly Python: reading the weights from
    # _parameters and skipping the module dispatch halves it (12 -> 6 µs per LowRankLinear).
    if _plain(module):
        params = module._parameters
        return F.linear(x, params["weight"], params["bias"])
    return module(x)


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
        modules = self._modules
        return _linear(modules["up"], _linear(modules["down"], x))

    def dense_weight(self):
        """The equivalent dense weight up @ down, [out, in] (nn.Linear convention)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")


def _version(x):
    """x's in-place version counter; None for inference-mode tensors, which keep none."""
    return None if x.is_inference() else x._version


class LowRankGroup(nn.Module):
    """The down factors of several low-rank layers fed the same input (q/k/v, gate/up), stacked:
    down.weight [r_1 + ... + r_n, in]. One GEMM per input instead of n; each member
    (GroupedLowRankLinear) reads its slice of the product. Members are called one after the other
    with the same tensor, so the product of the last input is kept until every member has read it.
    """

    def __init__(self, in_features, ranks, dtype=None, device=None):
        super().__init__()
        self.in_features = int(in_features)
        self.ranks = [int(r) for r in ranks]
        if len(self.ranks) < 2 or min(self.ranks) < 1:
            raise ValueError(f"LowRankGroup needs two or more ranks >= 1, got {self.ranks}")
        self.down = nn.Linear(self.in_features, sum(self.ranks), bias=False, dtype=dtype, device=device)
        self._last = None  # [weakref to the input, its version, product (..., Σr), readers left]

    def project(self, x):
        """x (..., in) -> (..., Σr), computed once per input tensor for all members."""
        last = self._last
        if last is not None and last[0]() is x and last[1] == _version(x):
            last[3] -= 1
            if last[3] <= 0:
                self._last = None
            return last[2]
        z = _linear(self._modules["down"], x)
        self._last = [weakref.ref(x), _version(x), z, len(self.ranks) - 1]
        return z

    def offsets(self):
        return [sum(self.ranks[:i]) for i in range(len(self.ranks))]

    def extra_repr(self):
        return f"in_features={self.in_features}, ranks={self.ranks}"


class GroupedLowRankLinear(nn.Module):
    """A LowRankLinear whose down factor lives in a LowRankGroup: y = up(z[..., offset:offset + rank])
    with z the group's stacked product. Stores only up.weight [out, r] (and the bias on `up`)."""

    def __init__(self, in_features, out_features, rank, offset, bias=True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank, self.offset = int(rank), int(offset)
        self.up = nn.Linear(self.rank, self.out_features, bias=bool(bias), dtype=dtype, device=device)
        self._group = None  # [LowRankGroup] (a list: not a submodule, its tensor is saved once)

    def join(self, group):
        if group.in_features != self.in_features or self.offset + self.rank > sum(group.ranks):
            raise ValueError(f"group of {group.in_features} inputs and ranks {group.ranks} cannot hold a member "
                             f"with {self.in_features} inputs at rows {self.offset}..{self.offset + self.rank}")
        self._group = [group]

    def down_weight(self):
        """This layer's rows of the stacked down factor, [r, in] (a view)."""
        return self._group[0].down.weight[self.offset:self.offset + self.rank]

    def forward(self, x):
        if self._group is None:
            raise RuntimeError("GroupedLowRankLinear is not joined to a LowRankGroup")
        z = self._group[0].project(x).narrow(-1, self.offset, self.rank)  # (..., r), a strided view
        return _linear(self._modules["up"], z)

    def dense_weight(self):
        return self.up.weight @ self.down_weight()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"offset={self.offset}, bias={self.up.bias is not None}")


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


class CacheBudget:
    """Bytes the DictionaryLinear layers of one model may keep in faster inference forms."""

    def __init__(self, limit_bytes=None):
        self.left = None if limit_bytes is None else int(limit_bytes)  # None: no limit

    @classmethod
    def from_environment(cls):
        value = os.environ.get("SUBSPACE_DICTIONARY_CACHE_MB", "").strip()
        return cls(None if not value else float(value) * 2**20)

    def fits(self, size):
        return self.left is None or size <= self.left

    def take(self, size):
        if self.left is not None:
            self.left -= size


def _csr(dense):
    """S [out, atoms] as a torch CSR tensor with int32 ids (half the bytes of int64 ones)."""
    import warnings

    rows, cols = dense.nonzero(as_tuple=True)
    crow = torch.zeros(dense.shape[0] + 1, dtype=torch.int32, device=dense.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=dense.shape[0]), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols.to(torch.int32), dense[rows, cols], size=tuple(dense.shape))


def _best_seconds(fn, device, repeats=3):
    """Best of `repeats` timed calls after one warm-up (synchronised on CUDA)."""
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


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
        # Inference form (see `forward`): "auto" measures the candidates once, or one of FORMS.
        self.representation = "auto"  # also resets _form (name, device, dtype) and _cached (key, tensor)
        self.cache_budget = None  # shared CacheBudget of the model; None: SUBSPACE_DICTIONARY_CACHE_MB

    def share_dictionary(self, owner):
        """Use `owner`'s dictionary from now on; this module's own is dropped."""
        if (owner.atoms, owner.in_features) != (self.atoms, self.in_features):
            raise ValueError(f"shared dictionary is {owner.atoms}x{owner.in_features}, "
                             f"this module needs {self.atoms}x{self.in_features}")
        del self.dictionary
        self._owner = [owner]

    @property
    def dictionary_weight(self):
        owner = self._owner[0] if self._owner is not None else self
        return owner._parameters["dictionary"]

    def atom_indices(self):
        """Atom ids [out, nonzeros]: the stored indices, or the bitmask decoded once and cached."""
        if self.positions == "indices":
            return self.indices
        # An id tensor decoded under inference_mode cannot be saved for backward: one per mode.
        key = (self.mask.data_ptr(), _version(self.mask), self.mask.device, torch.is_inference_mode_enabled())
        if self._decoded is None or self._decoded[0] != key:
            self._decoded = (key, _unpack_bitmask(self.mask, self.atoms, self.nonzeros))
        return self._decoded[1]

    def coefficients(self):
        """S as a dense [out, atoms] matrix (transient: the product needs only its packed form)."""
        dense = torch.zeros(self.out_features, self.atoms, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(1, self.atom_indices().long(), self.values)

    def forward(self, x):
        values, bias = self._parameters["values"], self._parameters.get("bias")
        trains = torch.is_grad_enabled() and (values.requires_grad or self.dictionary_weight.requires_grad)
        if trains or self.product is not scatter_product or self._representation == "packed":
            y = self._packed(x)  # gradients reach values and dictionary; Triton when the loader set it
            return y if bias is None else y + bias
        return self._apply_form(x, bias)

    def _packed(self, x):
        z = F.linear(x, self.dictionary_weight)  # (..., atoms)
        return self.product(z, self.values, self.atom_indices())  # (..., out)

    # ---------------------------------------------------------------- inference forms
    # Without gradients the layer may keep a faster form of S (or of W = S·D) beside the stored
    # code: "packed" (none), "csr" (torch.sparse CSR S, int32 ids), "dense_s" (S [out, atoms]) or
    # "dense_w" (W [out, in]). "auto" times each on this device once, at the first call, and keeps
    # the fastest whose extra bytes fit the model's cache budget (SUBSPACE_DICTIONARY_CACHE_MB;
    # 0 keeps the stored form only, unset puts no limit).

    FORMS = ("packed", "csr", "dense_s", "dense_w")

    def form_bytes(self, name):
        """Extra bytes the form keeps beside the stored code."""
        size = self.values.element_size()
        return {"packed": 0, "csr": self.out_features * self.nonzeros * (size + 4) + (self.out_features + 1) * 4,
                "dense_s": self.out_features * self.atoms * size,
                "dense_w": self.out_features * self.in_features * size}[name]

    def cache_bytes(self):
        """Bytes held now by the cached inference form (0 before the first call)."""
        if self._cached is None:
            return 0
        tensor = self._cached[1]
        if tensor.layout == torch.sparse_csr:
            return sum(t.numel() * t.element_size()
                       for t in (tensor.values(), tensor.col_indices(), tensor.crow_indices()))
        return tensor.numel() * tensor.element_size()

    def _build_form(self, name):
        with torch.no_grad():
            if name == "csr":
                return _csr(self.coefficients())
            if name == "dense_s":
                return self.coefficients()
            if name == "dense_w":
                return self.dense_weight()
        return None

    def _run_form(self, name, tensor, x, bias=None):
        if name == "packed":
            y = self._packed(x)
            return y if bias is None else y + bias
        if name == "dense_w":
            return F.linear(x, tensor, bias)
        z = F.linear(x, self.dictionary_weight)  # (..., atoms)
        if name == "dense_s":
            return F.linear(z, tensor, bias)
        flat = z.reshape(-1, self.atoms)  # (n, atoms)
        y = torch.sparse.mm(tensor, flat.T).T.reshape(*z.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _weights_key(self):
        values, d = self._parameters["values"], self.dictionary_weight
        return (values.data_ptr(), _version(values), d.data_ptr(), _version(d))

    @property
    def representation(self):
        return self._representation

    @representation.setter
    def representation(self, name):
        if name not in ("auto",) + self.FORMS:
            raise ValueError(f"DictionaryLinear representation {name!r} is not one of {('auto',) + self.FORMS}")
        self._representation, self._form, self._cached = name, None, None

    def _apply_form(self, x, bias):
        form = self._form
        if form is None or form[1] != x.device or form[2] != x.dtype:
            form = self._form = (self._choose(x), x.device, x.dtype)  # again on another device or dtype
            self._cached = None
        name = form[0]
        if name == "packed":
            return self._run_form(name, None, x, bias)
        key = self._weights_key()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._build_form(name))
        return self._run_form(name, self._cached[1], x, bias)

    def chosen_form(self):
        """The inference form in use ("auto" before the first call without gradients)."""
        return self._form[0] if self._form is not None else self.representation

    def _choose(self, x):
        if self.representation != "auto":
            return self.representation
        budget = self.cache_budget if self.cache_budget is not None else CacheBudget.from_environment()
        candidates = [name for name in self.FORMS if budget.fits(self.form_bytes(name))]
        if len(candidates) == 1:
            return candidates[0]
        # Decode (1 row) and a prefill-like batch (32 rows), each relative to the fastest form there.
        timings = {name: [] for name in candidates}
        for rows in (1, 32):
            probe = torch.randn(rows, self.in_features, device=x.device, dtype=x.dtype)
            for name in candidates:
                tensor = self._build_form(name)
                timings[name].append(_best_seconds(lambda: self._run_form(name, tensor, probe), x.device))
        fastest = [min(t[i] for t in timings.values()) for i in range(2)]
        chosen = min(candidates, key=lambda n: sum(t / f for t, f in zip(timings[n], fastest)))
        budget.take(self.form_bytes(chosen))
        return chosen

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


def _build_grouped(path, spec, old):
    if isinstance(old, GroupedLowRankLinear) and (old.rank, old.offset) == (spec["rank"], spec["offset"]):
        return None
    in_f, out_f = _checked_shape(path, spec, old)
    weight = old.weight
    return GroupedLowRankLinear(in_f, out_f, int(spec["rank"]), int(spec["offset"]), bias=bool(spec.get("bias", True)),
                                dtype=weight.dtype, device=weight.device)


def _build_group(model, path, spec, old):
    """A LowRankGroup is a new child of its members' common parent (the module it replaces is None)."""
    ranks = [int(r) for r in spec["ranks"]]
    if isinstance(old, LowRankGroup):
        return None if old.ranks == ranks else LowRankGroup(old.in_features, ranks, dtype=old.down.weight.dtype,
                                                            device=old.down.weight.device)
    if old is not None:
        raise ValueError(f"subspace layout: '{path}' names a {type(old).__name__}, not a place for a lowrank_group")
    like = next(model.get_submodule(spec["members"][0]).parameters())  # the member's dtype and device
    return LowRankGroup(int(spec["in_features"]), ranks, dtype=like.dtype, device=like.device)


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
             "lowrank_embedding": _build_embedding, "tied_lowrank": _build_tied, "grouped_lowrank": _build_grouped}


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
    ...}; version 3 adds "lowrank_experts", "lowrank_embedding" and "tied_lowrank", version 4
    "lowrank_group" and "grouped_lowrank" (docs/format.md).
    The new module is created on the replaced weight's device and dtype; on the meta device (as in
    from_pretrained) nothing is allocated.
    """
    for path, spec in layout.items():
        kind = spec.get("kind")
        builder = _BUILDERS.get(kind)
        if builder is None and kind != "lowrank_group":
            raise ValueError(
                f"subspace layout: module '{path}' has unknown kind {kind!r}; this modeling code "
                f"(checkpoint format version {FORMAT_VERSION}) knows {sorted(_BUILDERS) + ['lowrank_group']}")
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child) if kind != "lowrank_group" else getattr(parent, child, None)
        except AttributeError as err:
            raise ValueError(f"subspace layout: module '{path}' does not exist in "
                             f"{type(model).__name__}") from err
        new = builder(path, spec, old) if builder is not None else _build_group(model, path, spec, old)
        if new is not None:
            setattr(parent, child, new)
    budget = CacheBudget.from_environment()  # one for the model's dictionary layers
    for path, spec in layout.items():
        kind = spec.get("kind")
        module = model.get_submodule(path)
        if kind == "dictionary":
            module.cache_budget = budget
        owner = spec.get("dictionary_of")
        if owner is not None and module._owner is None:
            module.share_dictionary(model.get_submodule(owner))
        if kind == "tied_lowrank":
            module.tie_to(model.get_submodule(spec["factors_of"]))
        if kind == "grouped_lowrank":
            module.join(model.get_submodule(spec["group"]))
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
