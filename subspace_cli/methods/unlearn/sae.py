"""A TopK sparse autoencoder (SAE) trained on one layer's residual-stream activations.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093 (§2, §2.3, App. A):

    x̃   = x / s                                   (s: one scalar, see "Scaling" below)
    pre = (x̃ − b_dec) W_encᵀ + b_enc               [n, F]
    z   = ReLU(TopK_k(pre))                        [n, F], at most k non-zeros per row
    x̂   = s · (z W_dec + b_dec)                    [n, d]
    L   = ‖x̃ − (z W_dec + b_dec)‖² / d + α · L_aux

* W_dec [F, d] has unit-norm rows: after every Adam step they are renormalised, and before it the
  gradient component parallel to each row is removed (Gao et al. §A.2).
* Init: W_dec rows random unit vectors, W_enc = W_dec (i.e. the transpose of the paper's column
  layout: "encoder initialised to the transpose of the decoder"), b_enc = 0, b_dec = the geometric
  median of the (scaled) data (a few Weiszfeld iterations).
* Dead features, the paper's AuxK loss: a feature that has not fired for `dead_tokens` training
  tokens is dead; with e = x̃ − (z W_dec + b_dec) the main residual (detached),
      ê = ReLU(TopK_{k_aux}(pre restricted to dead features)) W_dec,
      L_aux = ‖e − ê‖² / ‖e − mean(e)‖²,  α = 1/32,  k_aux ≈ d/2 (the paper: 512 for d = 1024…4096).
  It gives dead features a gradient towards whatever the live ones miss.

Scaling (our choice): the model trains on x / s with s a
single scalar, s² = mean over tokens of ‖x − mean(x)‖² / d, stored as the buffer `scale`. One scalar
leaves every direction unchanged, so `decoder` rows are unit vectors in the raw residual-stream
coordinates (the pipeline uses them as directions of the layer's output); z is in scaled units;
`encode` / `decode` / `forward` take and give raw activations. It makes one learning rate fit layers
whose activation norms differ by orders of magnitude.

Training uses dense [B, F] matrices: on CPU, gathering the k selected rows per token (and the
sort-based scatter-add of its backward) measured slower than four extra dense matmuls at F = 8·d.

Deterministic for a given CPU generator: it draws the init, the geometric-median subsample and the
order of the batches (one permutation of the data per epoch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class SAEConfig(BaseModel):
    """How the built-in TopK SAE is sized and trained.

    Defaults sized for SmolLM2-135M (d = 576, F = 4608, 16k tokens of block 8's output) on CPU: measured
    normalised MSE 0.030 with 1.4% dead features in 54 s on 2 idle cores (600 steps: 0.024).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: int | None = Field(None, ge=1, description="dictionary size F; default 8 × d_model")
    k: int = Field(32, ge=1, description="active features per token (TopK)")
    steps: int = Field(400, ge=1, description="Adam steps")
    batch_size: int = Field(512, ge=1, description="tokens per step")
    lr: float | None = Field(None, gt=0, description="Adam learning rate, decaying linearly to 0 over the last 20% of "
                                                     "steps; default 0.05 / √d_model (2.1e-3 at d = 576)")
    aux_k: int | None = Field(None, ge=1, description="k_aux of the AuxK loss on dead features; default d_model / 2")
    aux_coef: float = Field(1 / 32, ge=0, description="α: weight of the AuxK loss (Gao et al.: 1/32)")
    dead_tokens: int = Field(32768, ge=1, description="a feature that has not fired for this many training tokens "
                                                      "is dead for AuxK (Gao et al.: 10M, for far longer runs)")


class TopKSAE(nn.Module):
    """x [n, d] ↦ (x̂ [n, d], z [n, F]); parameters in scaled units x / scale (see the module docstring)."""

    def __init__(self, d_model: int, features: int, k: int):
        super().__init__()
        if not 1 <= k <= features:
            raise ValueError(f"TopK SAE needs 1 ≤ k ≤ features, got k={k}, features={features}")
        self.k = k
        self.W_enc = nn.Parameter(torch.zeros(features, d_model))  # [F, d]
        self.b_enc = nn.Parameter(torch.zeros(features))  # [F]
        self.W_dec = nn.Parameter(torch.zeros(features, d_model))  # [F, d], unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(d_model))  # [d]
        self.register_buffer("scale", torch.ones(()))  # s: x̃ = x / s

    @property
    def decoder(self) -> torch.Tensor:
        """[F, d] unit-norm feature directions, in raw residual-stream coordinates."""
        return self.W_dec

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Raw x [n, d] -> pre [n, F]."""
        return (x / self.scale - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw x [n, d] -> z [n, F] ≥ 0, at most k non-zeros per row."""
        values, indices = self.pre_activations(x).topk(self.k, dim=-1)  # [n, k]
        return torch.zeros(x.shape[0], self.W_enc.shape[0], dtype=values.dtype,
                           device=values.device).scatter(-1, indices, values.relu())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, F] -> raw x̂ [n, d]."""
        return (z @ self.W_dec + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

@dataclass
class SAEFit:
    sae: TopKSAE
    normalised_mse: float  # ‖x − x̂‖² / ‖x − mean(x)‖² over the fit data: fraction of variance unexplained
    dead_fraction: float  # fraction of features that never fire on the fit data
    seconds: float


def _geometric_median(x: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm: argmin_m Σ‖x_i − m‖, x [n, d] -> [d]."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-8)  # [n]
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


@torch.no_grad()
def _remove_parallel_gradient(sae: TopKSAE) -> None:
    """Project each W_dec row's gradient onto the tangent space of the unit sphere at that row."""
    grad = sae.W_dec.grad
    if grad is not None:
        grad -= (grad * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec


@torch.no_grad()
def _evaluate(sae: TopKSAE, x: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(normalised MSE, dead fraction) of `sae` on raw x [n, d]."""
    mean = x.mean(0)
    error = total = 0.0
    fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        recon, z = sae(rows)
        error += float((rows - recon).double().pow(2).sum())
        total += float((rows - mean).double().pow(2).sum())
        fired |= (z > 0).any(0)
    return error / max(total, 1e-30), 1.0 - float(fired.float().mean())


def train_sae(activations: torch.Tensor, config: SAEConfig, generator: torch.Generator,
              progress: Callable[[int], None] | None = None) -> SAEFit:
    """Fit a TopK SAE to activations [n, d] (float32, on their device); `progress(step)` after each step."""
    began = time.perf_counter()
    x = activations.detach().float()
    n, d = x.shape
    features = config.features if config.features is not None else 8 * d
    if n == 0:
        raise ValueError("train_sae needs at least one activation row")
    device = x.device
    sae = TopKSAE(d, features, min(config.k, features)).to(device)
    aux_k = min(config.aux_k if config.aux_k is not None else max(d // 2, 1), features)

    # Scale and init, all draws from `generator` on CPU (then moved), so CPU runs are reproducible.
    with torch.no_grad():
        scale = ((x - x.mean(0)).pow(2).sum(-1).mean() / d).sqrt().clamp_min(1e-12)
        sae.scale.fill_(float(scale))
        xs = x / sae.scale  # [n, d] scaled data
        directions = torch.randn(features, d, generator=generator).to(device)
        directions /= directions.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions)
        sample = torch.randperm(n, generator=generator)[:4096].to(device)
        sae.b_dec.copy_(_geometric_median(xs[sample]))

    # Adam moves every coordinate by ~lr, and a unit-norm row has coordinates ~1/√d: lr ∝ 1/√d keeps the
    # relative step per row the same across widths (0.05/√d: tuned at d = 576, also good at d = 32).
    lr = config.lr if config.lr is not None else 0.05 / math.sqrt(d)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_from = int(0.8 * config.steps)
    batch = min(config.batch_size, n)
    idle = torch.zeros(features, dtype=torch.long, device=device)  # tokens since each feature last fired
    order, cursor = torch.empty(0, dtype=torch.long), n
    for step in range(config.steps):
        if cursor + batch > n:  # a new epoch: one fresh permutation
            order, cursor = torch.randperm(n, generator=generator).to(device), 0
        rows = xs[order[cursor:cursor + batch]]  # [B, d]
        cursor += batch

        pre = (rows - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # [B, F]
        values, indices = pre.detach().topk(sae.k, dim=-1)  # [B, k]
        z = torch.zeros_like(pre).scatter(-1, indices, pre.gather(-1, indices).relu())  # [B, F]
        residual = rows - (z @ sae.W_dec + sae.b_dec)  # e [B, d]
        loss = residual.pow(2).sum(-1).mean() / d  # ≈ normalised MSE, as the scaled data has unit variance per dim
        dead = (idle >= config.dead_tokens).nonzero().squeeze(-1)  # [n_dead]
        if config.aux_coef > 0 and dead.numel() > 0:
            pre_dead = pre[:, dead]  # [B, n_dead]
            picked = pre_dead.detach().topk(min(aux_k, dead.numel()), dim=-1).indices  # [B, k_aux]
            z_dead = torch.zeros_like(pre_dead).scatter(-1, picked, pre_dead.gather(-1, picked).relu())
            target = residual.detach()
            variance = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            aux = (target - z_dead @ sae.W_dec[dead]).pow(2).sum(-1).mean() / variance
            loss = loss + config.aux_coef * aux
        fired = indices[values > 0]  # features that fired in this batch

        for group in optimizer.param_groups:  # linear decay to 0 over the last 20% of steps
            group["lr"] = lr * min(1.0, (config.steps - step) / max(config.steps - decay_from, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_gradient(sae)
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            idle += batch
            idle[fired] = 0
        if progress is not None:
            progress(step + 1)

    sae.requires_grad_(False)
    normalised_mse, dead_fraction = _evaluate(sae, x)
    return SAEFit(sae=sae, normalised_mse=normalised_mse, dead_fraction=dead_fraction,
                  seconds=time.perf_counter() - began)
