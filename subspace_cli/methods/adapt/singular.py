"""Adapters that live in the singular basis of each frozen weight W = U Σ Vᵀ (float32 SVD).

- `svfit`: train the top-r singular values only (Sun et al. 2024, arXiv 2409.05926).
- `svft`: a sparse trainable core between the top-r singular vectors (Lingam et al. 2024, arXiv 2405.19597).
- `complementary`: LoRA confined to the orthogonal complement of the top-k singular subspaces, so the
  top-k singular triplets survive exactly (OPLoRA: Xiong & Xie 2025, arXiv 2510.13003).

Each keeps the base layer untouched and adds a factored update, so every one exports exactly as a
LoRA pair on the untouched base (A [r', in], B [out, r'], scaling folded into B).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.methods.adapt.base import AdapterLayer, AdapterMethod, LoraDelta, layerwise
from subspace_cli.methods.adapt.lora_family import DEFAULT_LR as LORA_LR
from subspace_cli.methods.registry import MethodConfig, Needs, register
from subspace_cli.walk import is_linear_like, weight_matrix

# Step sizes: an Adam step moves each trained scalar by ~lr. A singular value moves ΔW by lr along one
# unit rank-one direction u_i v_iᵀ, while a LoRA step moves all `out` entries of B at once (times A's rows,
# norm ~0.58), so matching LoRA's 2e-4 needs ~0.58·√out·2e-4: ~3e-3 at out = 576 (SmolLM2-135M), ~7e-3 at
# 4096. Measured on the tiny test llama (r = 4, 60 steps): svfit at 2e-3 gains what LoRA gains at 2e-4 and
# 5e-4 barely moves. svft trains ~(2·band + 1) entries per direction, so it moves ~√5 faster at the same lr
# (measured: svft at 2e-3 ≈ svfit at 5e-3); hence the lower value.
SVFIT_LR = 5e-3
SVFT_LR = 2e-3


class SvfitConfig(MethodConfig):
    """No options: the rank (--rank) is the number of singular values trained."""


class SvftConfig(MethodConfig):
    pattern: Literal["plain", "banded", "random", "top-k"] = Field(
        "banded", description="which entries of the r×r core M train: plain = diagonal; banded = |i − j| ≤ band; "
        "random = diagonal + `extra` random off-diagonals per row; top-k = the (1 + extra)·r entries with the largest "
        "|u_iᵀ v_j| (square layers only, as in the paper)")
    band: int = Field(2, ge=1, description="banded: half-width of the band of M (entries |i − j| ≤ band train)")
    extra: int = Field(2, ge=1, description="random: off-diagonal entries per row of M; top-k: k = (1 + extra)·r "
                       "(both capped at r·r)")


class ComplementaryConfig(MethodConfig):
    preserve: int = Field(8, ge=0, description="k: the top-k singular triplets of each W are kept exactly; the LoRA "
                          "update is projected onto their orthogonal complement (k ≤ min(out, in) − 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (PEFT lora_dropout)")


def _problem(module: nn.Module, rank: int) -> str | None:
    """Why this module cannot take a singular-basis adapter of this rank (None: it can)."""
    if not is_linear_like(module):
        return f"is a {type(module).__name__}; these methods adapt nn.Linear and GPT-2 Conv1D layers"
    out_f, in_f = weight_matrix(module).shape
    if rank > min(out_f, in_f):
        return f"[{out_f}×{in_f}] cannot take rank {rank} > min(out, in) = {min(out_f, in_f)}"
    return None


def _svft_problem(module: nn.Module, rank: int, config: SvftConfig) -> str | None:
    problem = _problem(module, rank)
    out_f, in_f = weight_matrix(module).shape if problem is None else (0, 0)
    if problem is None and config.pattern == "top-k" and out_f != in_f:
        problem = (f"[{out_f}×{in_f}] is not square: svft pattern=top-k ranks |u_iᵀ v_j|, which needs out = in; "
                   "use another pattern or --targets for the square layers (e.g. 'q_proj|o_proj')")
    return problem


def _complementary_problem(module: nn.Module, rank: int, config: ComplementaryConfig) -> str | None:
    problem = _problem(module, rank)
    if problem is None and config.preserve > min(weight_matrix(module).shape) - 1:
        out_f, in_f = weight_matrix(module).shape
        problem = (f"[{out_f}×{in_f}] cannot preserve {config.preserve} singular triplets: preserve must be ≤ "
                   f"min(out, in) − 1 = {min(out_f, in_f) - 1}")
    return problem


def _require(problem: str | None, method: str, where: str) -> None:
    if problem is not None:
        raise UsageError(f"{method}: layer {where} {problem}")


@torch.no_grad()
def _top_svd(base: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of the base weight: U_k [out, k], σ [k], V_kᵀ [k, in] (float32)."""
    u, s, vh = torch.linalg.svd(weight_matrix(base).detach().float(), full_matrices=False)
    return u[:, :k].contiguous(), s[:k].clone(), vh[:k].contiguous()


class SvfitLayer(AdapterLayer):
    """SVFit (Sun et al. 2024, arXiv 2409.05926): W = U_r Σ_r V_rᵀ + W_res, fine-tuned as
    W′ = W_res + U_r Σ′_r V_rᵀ with U_r, V_r, W_res frozen and only the r singular values Σ′_r trained (init Σ_r).
    Kept as the frozen W plus

        ΔW = U_r diag(σ − σ₀) V_rᵀ           export: A = V_rᵀ [r, in], B = U_r diag(σ − σ₀) [out, r]
    """

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__(base)
        _require(_problem(base, rank), "svfit", f"of type {type(base).__name__}")
        u, s, vh = _top_svd(base, rank)
        self.register_buffer("u", u, persistent=False)  # [out, r]
        self.register_buffer("vh", vh, persistent=False)  # [r, in]
        self.register_buffer("sigma0", s, persistent=False)  # [r]
        self.sigma = nn.Parameter(s.clone())  # [r], the only trainable tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x.to(self.vh.dtype), self.vh) * (self.sigma - self.sigma0)  # [..., r]: diag(σ−σ₀)·V_rᵀx
        return y + F.linear(h, self.u).to(y.dtype)

    def lora_delta(self) -> LoraDelta:
        return LoraDelta(self.vh.clone(), self.u * (self.sigma - self.sigma0).detach())


def svft_pattern(pattern: str, rank: int, band: int, extra: int, u: torch.Tensor, vh: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) [nnz] of the trainable entries of the r×r core, sorted row-major, no duplicates."""
    r = rank
    if pattern == "plain":
        mask = torch.eye(r, dtype=torch.bool)
    elif pattern == "banded":
        i = torch.arange(r)
        mask = (i[:, None] - i[None, :]).abs() <= band
    elif pattern == "random":
        mask = torch.eye(r, dtype=torch.bool)
        for row in range(r):  # `extra` distinct off-diagonal columns per row
            picks = torch.randperm(r - 1, generator=generator, device=generator.device)[:extra].cpu()
            mask[row, picks + (picks >= row).long()] = True
    else:  # top-k: the paper ranks the alignment u_iᵀ v_j; |·| because singular vectors' signs are arbitrary
        alignment = (u.T @ vh.T).abs().flatten().cpu()  # [r·r], entry (i, j) = |u_iᵀ v_j|
        mask = torch.zeros(r * r, dtype=torch.bool)
        mask[torch.topk(alignment, min((1 + extra) * r, r * r)).indices] = True
        mask = mask.reshape(r, r)
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


class SvftLayer(AdapterLayer):
    """SVFT (Lingam et al. 2024, arXiv 2405.19597), Eq. W′ = W + U M Vᵀ with M sparse on a fixed pattern
    (plain, banded, random, top-k), here over the top-r singular vectors:

        ΔW = U_r M V_rᵀ,  M [r, r] zero outside (rows, cols)    export: A = V_rᵀ [r, in], B = U_r M [out, r]

    Only the nnz values of M train; M starts at zero (the paper's code starts it random behind a gate) so the
    adapted model equals the base at step 0.
    """

    def __init__(self, base: nn.Module, rank: int, config: SvftConfig, generator: torch.Generator) -> None:
        super().__init__(base)
        _require(_svft_problem(base, rank, config), "svft", f"of type {type(base).__name__}")
        u, _, vh = _top_svd(base, rank)
        rows, cols = svft_pattern(config.pattern, rank, config.band, config.extra, u, vh, generator)
        self.register_buffer("u", u, persistent=False)  # [out, r]
        self.register_buffer("vh", vh, persistent=False)  # [r, in]
        self.register_buffer("rows", rows.to(u.device), persistent=False)  # [nnz]
        self.register_buffer("cols", cols.to(u.device), persistent=False)  # [nnz]
        self.values = nn.Parameter(torch.zeros(len(rows), device=u.device))  # [nnz], M[rows, cols]

    def core(self) -> torch.Tensor:
        """M [r, r] (dense: r² is tiny next to the layer)."""
        r = self.u.shape[1]
        return self.values.new_zeros(r, r).index_put((self.rows, self.cols), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(F.linear(x.to(self.vh.dtype), self.vh), self.core())  # [..., r]: M·V_rᵀx
        return y + F.linear(h, self.u).to(y.dtype)

    def lora_delta(self) -> LoraDelta:
        return LoraDelta(self.vh.clone(), self.u @ self.core().detach())


class ComplementaryLayer(AdapterLayer):
    """LoRA in the orthogonal complement of W's top-k singular subspaces — OPLoRA (Xiong & Xie 2025,
    arXiv 2510.13003), Eq. ΔW = P_L (s·B A) P_R with P_L = I − U_k U_kᵀ, P_R = I − V_k V_kᵀ.
    Then (W + ΔW) v_i = σ_i u_i and (W + ΔW)ᵀ u_i = σ_i v_i for i ≤ k: the top-k triplets stay exact.

    A is Kaiming-uniform as in PEFT, B = 0, s = alpha / rank (that init and scaling are PEFT LoRA's, chosen
    here; the projection is OPLoRA's). The projections act on the factors, never as dense [in, in] or
    [out, out] matrices:  A′ = A − (A V_k) V_kᵀ [r, in],  B′ = s·(B − U_k (U_kᵀ B)) [out, r], also the export.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, config: ComplementaryConfig,
                 generator: torch.Generator) -> None:
        super().__init__(base)
        _require(_complementary_problem(base, rank, config), "complementary", f"of type {type(base).__name__}")
        u, _, vh = _top_svd(base, config.preserve)
        out_f, in_f = u.shape[0], vh.shape[1]
        self.register_buffer("u_k", u, persistent=False)  # [out, k]
        self.register_buffer("v_k", vh.T.contiguous(), persistent=False)  # [in, k]
        a = torch.empty(rank, in_f)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's lora_A init: U(±1/√in)
        self.lora_A = nn.Parameter(a.to(u.device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=u.device))  # [out, r]
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A·P_V⊥ [r, in], s·P_U⊥·B [out, r]); O((in + out)·r·k), cheaper than projecting activations."""
        a = self.lora_A - (self.lora_A @ self.v_k) @ self.v_k.T
        b = self.scaling * (self.lora_B - self.u_k @ (self.u_k.T @ self.lora_B))
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.factors()
        return y + F.linear(F.linear(self.dropout(x.to(a.dtype)), a), b).to(y.dtype)

    def lora_delta(self) -> LoraDelta:
        a, b = self.factors()
        return LoraDelta(a.detach().clone(), b.detach().clone())


def _checked(name: str, factory: Callable[..., AdapterLayer], problem: Callable[..., str | None]):
    """`layerwise(factory)` that first checks every layer, so a bad one is named and nothing is wrapped."""
    inner = layerwise(factory)

    def build(model, layers, rank, alpha, config, context):
        for path, module in layers.items():
            _require(problem(module, rank, config), name, path)
        return inner(model, layers, rank, alpha, config, context)

    build.factory = factory
    return build


def _svfit(base, rank, alpha, config, generator):
    return SvfitLayer(base, rank)


def _svft(base, rank, alpha, config, generator):
    return SvftLayer(base, rank, config, generator)


def _complementary(base, rank, alpha, config, generator):
    return ComplementaryLayer(base, rank, alpha, config, generator)


_NEEDS = {Needs.TRAINING_DATA}
register(AdapterMethod(name="svfit", config_class=SvfitConfig,
                attach=_checked("svfit", _svfit, lambda m, rank, config: _problem(m, rank)),
                paper="Sun et al. 2024, arXiv 2409.05926",
                summary="trains only the top-r singular values of each W (singular vectors frozen)",
                needs=_NEEDS, default_lr=SVFIT_LR))
register(AdapterMethod(name="svft", config_class=SvftConfig, attach=_checked("svft", _svft, _svft_problem),
                paper="Lingam et al. 2024, arXiv 2405.19597",
                summary="trains a sparse core M in ΔW = U_r M V_rᵀ (plain, banded, random or top-k pattern)",
                needs=_NEEDS, default_lr=SVFT_LR))
register(AdapterMethod(name="complementary", config_class=ComplementaryConfig,
                attach=_checked("complementary", _complementary, _complementary_problem),
                paper="Xiong & Xie 2025, arXiv 2510.13003 (OPLoRA)",
                summary="LoRA projected off the top-k singular subspaces of W, which it keeps exactly",
                needs=_NEEDS, default_lr=LORA_LR))
