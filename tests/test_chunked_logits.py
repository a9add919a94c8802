"""Logits a chunk of positions at a time (issue 16, defect 3) equal the whole-batch logits.

For every architecture of the tiny matrix: chunk logits, perplexity / NLL, membership losses, KL
against a baseline, and the training loss with its gradients equal the full-logits computation to
relative 1e-5 in fp32, with a chunk (5 positions) that splits the 12 scored positions unevenly
(5, 5, 2). Gemma 2 and 3 run with final_logit_softcapping 0.5, which bites on these logits.
Measured worst over the matrix (torch 2.13 CPU): logits 0, NLL 1.3e-8, KL 6.3e-9, loss 9.9e-8,
gradients 1.1e-7 (relative).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_architectures import ARCHITECTURES, MOE, tiny_config

from subspace_cli.evaluate import chunked_logits
from subspace_cli.evaluate.chunked_logits import (
    BatchLogits,
    causal_lm_loss,
    positions_per_chunk,
)
from subspace_cli.evaluate.drift import score_windows
from subspace_cli.evaluate.membership import window_losses
from subspace_cli.evaluate.perplexity import perplexity

CHUNK = 5  # 12 scored positions -> chunks of 5, 5, 2
RTOL = 1e-5
SOFTCAP = 0.5  # small enough that logits without the cap differ from capped ones by far more than RTOL


def build(name: str, seed: int = 0, **overrides):
    if name in ("gemma2", "gemma3"):
        overrides.setdefault("final_logit_softcapping", SOFTCAP)
    torch.manual_seed(seed)
    return getattr(transformers, ARCHITECTURES[name][1])(tiny_config(name, **overrides)).eval()


def windows(n: int = 3, length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def close(a: float, b: float, rtol: float = RTOL) -> bool:
    return abs(a - b) <= rtol * abs(b)


def reference_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-window mean next-token NLL from the whole [b, L, V] logits (the computation before chunking)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double().mean(1)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_chunk_logits_equal_full_logits(name):
    model = build(name)
    ids = windows()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # [3, 13, 128]
        batch = BatchLogits(model, ids, chunk=CHUNK)
        assert batch.full is None  # the chunked path, not the fallback
        chunked = torch.cat([batch.logits(p) for p in batch.chunks()], dim=1)
    assert chunked.shape == full.shape
    assert (chunked - full).abs().max() <= RTOL * full.abs().max()  # measured 0: bit-identical on CPU
    if name in ("gemma2", "gemma3"):  # the forward's softcapping is applied to the chunks too
        assert full.abs().max() <= SOFTCAP
        uncapped = model.lm_head(batch.hidden)
        assert (uncapped - full).abs().max() > 100 * RTOL * full.abs().max()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_perplexity_and_membership_equal_full_logits(name):
    model = build(name)
    data = windows(n=5)
    expected = reference_nll(model, data)  # [5]
    result = perplexity(model, data, batch_size=2, chunk=CHUNK)
    assert result["n_tokens"] == 5 * 12
    assert close(result["nll"], float(expected.mean()))
    default = perplexity(model, data, batch_size=2)  # default chunk: whole windows at this vocabulary
    assert close(default["nll"], float(expected.mean()))
    losses = window_losses(model, data, batch_size=2, chunk=CHUNK)
    assert torch.allclose(losses, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_kl_and_baseline_equal_full_logits(name):
    model, baseline = build(name, seed=0), build(name, seed=1)
    data = windows(n=4)
    with torch.no_grad():
        lp = model(input_ids=data, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        lp_base = baseline(input_ids=data, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    kl = float((lp_base.exp() * (lp_base - lp)).sum(-1).double().mean())
    result = score_windows(model, data, baseline=baseline, batch_size=3, chunk=CHUNK)
    assert kl > 1e-3  # two different models: the comparison is not 0 == 0
    assert close(result["kl"], kl)
    assert close(result["nll"], float(reference_nll(model, data).mean()))
    assert close(result["baseline_nll"], float(reference_nll(baseline, data).mean()))
    assert score_windows(model, data, baseline=model, batch_size=3, chunk=CHUNK)["kl"] == pytest.approx(0, abs=1e-7)


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _training_batch():
    ids = windows(n=3, length=13, seed=2)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # a padded row
    labels = ids.clone()
    labels[0, 10:] = -100
    labels[1, :4] = -100  # a prompt that carries no loss
    return ids, mask, labels


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_training_loss_and_gradients_equal_full_logits(name):
    model = build(name).train()
    ids, mask, labels = _training_batch()
    expected, grads = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    loss, chunk_grads = _loss_and_grads(model, lambda: causal_lm_loss(model, ids, mask, labels, chunk=CHUNK))
    assert close(loss, expected)
    assert set(chunk_grads) == set(grads)
    for n, g in grads.items():
        assert (chunk_grads[n] - g).norm() <= RTOL * g.norm() + 1e-9, n


@pytest.mark.parametrize("name", MOE)
def test_moe_router_loss_is_added_as_transformers_does(name):
    model = build(name, output_router_logits=True).train()
    ids, mask, labels = _training_batch()
    expected, grads = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    loss, chunk_grads = _loss_and_grads(model, lambda: causal_lm_loss(model, ids, mask, labels, chunk=CHUNK))
    without = float(causal_lm_loss(model, ids, mask, labels, chunk=CHUNK, router_aux=False).detach())
    assert close(loss, expected) and abs(loss - without) > 1e-4  # the router term is there, and counted once
    for n, g in grads.items():
        assert (chunk_grads[n] - g).norm() <= RTOL * g.norm() + 1e-9, n


def _saved_logit_shapes(model, loss_fn, vocab: int) -> list[tuple]:
    """Shapes of the logit-like activations ([..., V], more than one row) autograd saves for backward
    while `loss_fn` runs; views of parameters (lm_head's weight transposed, [d, V]) are not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = []

    def pack(tensor):
        if tensor.shape and tensor.shape[-1] == vocab and tensor.numel() >= 2 * vocab \
                and tensor.untyped_storage().data_ptr() not in weights:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return shapes


def test_training_keeps_no_chunk_logits_for_backward():
    model = build("llama").train()
    ids, mask, labels = _training_batch()
    assert _saved_logit_shapes(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss, 128)
    assert _saved_logit_shapes(model, lambda: causal_lm_loss(model, ids, mask, labels, chunk=CHUNK), 128) == []


def test_peft_wrapped_model_trains_the_same():
    peft = pytest.importorskip("peft")
    base = build("llama").train()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                      init_lora_weights=False))
    ids, mask, labels = _training_batch()
    expected, grads = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    loss, chunk_grads = _loss_and_grads(model, lambda: causal_lm_loss(model, ids, mask, labels, chunk=CHUNK))
    assert close(loss, expected)
    assert grads and set(chunk_grads) == set(grads)
    for n, g in grads.items():
        assert (chunk_grads[n] - g).norm() <= RTOL * g.norm() + 1e-9, n


class _NoLogitsToKeep(transformers.LlamaForCausalLM):
    """A CausalLM whose forward cannot slice positions: chunking falls back to whole logits."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache)


def test_model_without_logits_to_keep_falls_back_and_says_so(caplog):
    torch.manual_seed(0)
    model = _NoLogitsToKeep(tiny_config("llama")).eval()
    data = windows()
    chunked_logits._warned.discard("_NoLogitsToKeep")
    with caplog.at_level(logging.INFO, logger="subspace_cli.evaluate.chunked_logits"):
        result = perplexity(model, data, chunk=CHUNK)
        perplexity(model, data, chunk=CHUNK)
    assert close(result["nll"], float(reference_nll(model, data).mean()))
    said = [r.getMessage() for r in caplog.records if "logits_to_keep" in r.getMessage()]
    assert len(said) == 1 and "_NoLogitsToKeep" in said[0]
    model.train()
    ids, mask, labels = _training_batch()
    expected = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach())
    assert close(float(causal_lm_loss(model, ids, mask, labels, chunk=CHUNK).detach()), expected)


def test_fsdp_wrapped_model_falls_back_to_whole_logits():
    class FullyShardedDataParallel(torch.nn.Module):  # stands for torch's wrapper (needs a process group)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model = build("llama")
    wrapped = FullyShardedDataParallel(model)
    data = windows()
    with torch.no_grad():
        batch = BatchLogits(wrapped, data, chunk=CHUNK)
        assert batch.full is not None and batch.inner is model
        assert BatchLogits(model, data, chunk=CHUNK).full is None
    assert close(perplexity(wrapped, data, chunk=CHUNK)["nll"], float(reference_nll(model, data).mean()))


def test_trainer_eval_loss_and_unlearn_loss_equal_full_logits(monkeypatch):
    from subspace_cli.io.training_data import TokenBatchSet
    from subspace_cli.methods.unlearn import base as unlearn_base
    from subspace_cli.methods.unlearn.loss_based import lm_loss
    from subspace_cli.pipelines.trainer import eval_loss

    model = build("gemma2")
    ids, mask, labels = _training_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    expected = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum") / (labels[:, 1:] != -100).sum()
    # 2 sequences × V = 128 × 4 bytes is 1 KiB of float32 logits per position: a 3 KiB budget, 3-position chunks.
    monkeypatch.setenv("SUBSPACE_LOGITS_BUDGET_MB", str(3 / 1024))
    assert positions_per_chunk(2, 128) == 3
    data = TokenBatchSet(input_ids=ids, labels=labels, attention_mask=mask)
    assert close(eval_loss(model, data, batch_size=2), float(expected))
    assert close(float(lm_loss(model, ids).detach()), float(unlearn_base.lm_loss(model, ids).detach()))


def test_concrete_objectives_equal_full_logits(monkeypatch):
    from torch.func import functional_call

    from subspace_cli.methods.merge.concrete import _Objective

    model = build("gemma3")
    monkeypatch.setenv("SUBSPACE_LOGITS_BUDGET_MB", str(3 / 1024))  # 3-position chunks for 2 rows
    ids = windows(n=2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for objective in ("lm", "entropy"):
        logits = functional_call(model, params, (ids,), {"use_cache": False}).logits.float()
        if objective == "lm":
            expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
        else:
            logp = logits.log_softmax(-1)
            expected = -(logp.exp() * logp).sum(-1).mean()
        grads = torch.autograd.grad(expected, list(params.values()))
        loss = functional_call(_Objective(model, objective), {f"model.{n}": p for n, p in params.items()}, (ids,))
        chunk_grads = torch.autograd.grad(loss, list(params.values()))
        assert close(float(loss.detach()), float(expected.detach())), objective
        for name, g, cg in zip(params, grads, chunk_grads):
            assert (cg - g).norm() <= RTOL * g.norm() + 1e-9, (objective, name)


@pytest.mark.parametrize("value", ["0", "-1", "lots", "nan", "inf"])
def test_bad_budget_is_a_usage_error(monkeypatch, value):
    from subspace_cli.errors import UsageError

    monkeypatch.setenv("SUBSPACE_LOGITS_BUDGET_MB", value)
    with pytest.raises(UsageError, match="SUBSPACE_LOGITS_BUDGET_MB"):
        positions_per_chunk(8, 1000)


def test_positions_per_chunk_fits_the_budget():
    # 262144-token vocabulary, batch 8: 8 MiB of float32 per position, 64 MiB -> 8 positions.
    assert positions_per_chunk(8, 262144) == 8
    assert positions_per_chunk(64, 262144) == 1  # never below one position
    assert positions_per_chunk(8, 49152, budget=2**30) == 682
