"""Next-token logits a chunk of positions at a time, so peak memory is one chunk's logits.

A causal LM's forward makes logits [b, L, V] for every position: with V = 262144, b = 8 and L = 512
that is 4.3 GB in float32, against [b, L, d] = 8 MB of final hidden states (d = 512). Here the
decoder runs once per batch and its output (h [b, L, d] and whatever else it returns) is kept; the
logits of positions P are then made by the model's own forward, with its decoder's forward replaced
by one that returns the kept output, and `logits_to_keep=P` (a 1-D index tensor). Every transformers
5.x CausalLM forward slices h by it before lm_head and then applies what it applies after lm_head
(Gemma 2/3's final_logit_softcapping, any scaling; tied embeddings are lm_head itself), so a chunk's
logits are the model's logits at those positions, whatever the architecture.

Chunk size: positions per chunk = max(1, budget // (V × 4 bytes × b)), one float32 chunk within
the budget: 64 MiB by default (SUBSPACE_LOGITS_BUDGET_MB to change it). Why 64 MiB: at V = 262144
and b = 8 it still gives 8 positions, so lm_head multiplies [64, d] × [d, V] (efficient) in 64
forward calls for L = 512 (negligible beside the decoder), and at V = 49152 (SmolLM2), b = 8, 42
positions. Cross-entropy holds the chunk's logits and its log-softmax at once, so scoring adds
~2 × the budget (measured 133–142 MiB at V = 262144, whatever b × L: benchmarks/RESULTS.md); KL
holds both models' chunks, so it splits the budget between them.

Training losses checkpoint each chunk (torch.utils.checkpoint): backward recomputes the chunk's
logits, so autograd keeps h, not every chunk's [b, c, V].

A model whose forward takes no `logits_to_keep`, whose decoder is not found, or that is sharded
with FSDP gets the full logits once per batch as before (memory unbounded), with one log line
saying so.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from subspace_cli.errors import UsageError

log = logging.getLogger(__name__)

BUDGET_BYTES = 64 * 2**20  # one float32 chunk of logits; see the module docstring
_warned: set[str] = set()


def budget_bytes() -> int:
    """The logits budget in bytes: SUBSPACE_LOGITS_BUDGET_MB (MiB) when set, else 64 MiB."""
    value = os.environ.get("SUBSPACE_LOGITS_BUDGET_MB", "").strip()
    if not value:
        return BUDGET_BYTES
    try:
        mb = float(value)
    except ValueError:
        mb = float("nan")
    if not mb > 0 or mb == float("inf"):
        raise UsageError(f"SUBSPACE_LOGITS_BUDGET_MB={value!r} is not a positive number of MiB; unset it for "
                         "the default (64) or set e.g. 256")
    return max(1, int(mb * 2**20))


def positions_per_chunk(batch: int, vocab: int, budget: int | None = None) -> int:
    """Positions whose float32 logits [batch, c, vocab] fit in `budget` bytes (at least 1)."""
    budget = budget_bytes() if budget is None else budget
    return max(1, budget // (max(1, vocab) * 4 * max(1, batch)))


def _unwrapped(model) -> list:
    """`model` and the modules inside its DDP / FSDP / accelerate / PEFT wrappers, outermost first."""
    chain = [model]
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP, accelerate
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel: LoRA-style layers are injected in place
            model = model.get_base_model()
        if any(model is seen for seen in chain):
            return chain
        chain.append(model)


def causal_lm(model):
    """The transformers CausalLM inside DDP / accelerate / PEFT wrappers (the module itself if none)."""
    return _unwrapped(model)[-1]


def _fsdp(model) -> bool:
    """FSDP (1: a FullyShardedDataParallel wrapper; 2: fully_shard's FSDPModule classes) reshards
    lm_head once the root forward returns, so chunk calls outside that forward would see shards."""
    return any(cls.__name__ in ("FullyShardedDataParallel", "FSDPModule")
               for module in _unwrapped(model) for cls in type(module).__mro__)


def vocab_size(model) -> int:
    """V of the model's logits: rows of its output embedding (a Linear or a tied Embedding, both
    [V, d]), else config.vocab_size."""
    inner = causal_lm(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    config = getattr(inner, "config", None)
    return int(getattr(config, "vocab_size", 0) or 0)


def _decoder(inner):
    """The module whose output the CausalLM forward projects, or None."""
    get = getattr(inner, "get_decoder", None)
    try:
        decoder = get() if get is not None else getattr(inner, "base_model", None)
    except Exception:  # noqa: BLE001 - some models raise for a decoder they cannot name
        decoder = None
    if not isinstance(decoder, torch.nn.Module) or decoder is inner:
        return None
    return decoder


def _takes_logits_to_keep(inner) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _fallback_once(inner, why: str) -> None:
    name = type(inner).__name__
    if name not in _warned:
        _warned.add(name)
        log.info("%s: %s; its logits are made for whole batches [b, L, V] (memory not bounded by chunks)", name, why)


def _with_first(output, hidden: torch.Tensor):
    """`output` (a ModelOutput or a tuple) with its first field, the final hidden states, replaced."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    fields = dict(output)
    fields[next(iter(fields))] = hidden
    return type(output)(**fields)


class BatchLogits:
    """One forward pass over a batch; logits for any positions of it, chunk by chunk.

    `model` may be wrapped (DDP, accelerate, PEFT): the decoder runs through the wrapper (so DDP and
    adapters see one ordinary forward), and chunk logits through the inner CausalLM's forward.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 chunk: int | None = None):
        self.input_ids, self.attention_mask = input_ids, attention_mask  # [b, L]
        self.inner = causal_lm(model)
        self.chunk = chunk or positions_per_chunk(input_ids.shape[0], vocab_size(model))
        self.full: torch.Tensor | None = None  # [b, L, V] on the fallback path only
        self.aux_loss = None  # a MoE forward's router load-balancing loss, when it makes one
        self.decoder = _decoder(self.inner)
        if self.decoder is None or not _takes_logits_to_keep(self.inner) or _fsdp(model):
            why = ("no decoder found" if self.decoder is None else "it is sharded with FSDP" if _fsdp(model)
                   else "its forward takes no logits_to_keep")
            self._full_forward(model, why)
            return
        captured = []
        handle = self.decoder.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            # Zero positions kept: lm_head makes [b, 0, V]; the decoder's output is caught on the way.
            out = model(**self._inputs(), logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
        finally:
            handle.remove()
        if len(captured) != 1:
            self._full_forward(model, f"its decoder ran {len(captured)} times in one forward")
            return
        self.decoder_output = captured[0]
        self.aux_loss = getattr(out, "aux_loss", None)
        output = self.decoder_output
        self.hidden = output[0] if isinstance(output, tuple) else next(iter(output.values()))  # [b, L, d]

    def _full_forward(self, model, why: str) -> None:
        """The fallback: the whole [b, L, V] once, as before chunking."""
        _fallback_once(self.inner, why)
        self.decoder = None
        out = model(**self._inputs())
        self.full, self.aux_loss = out.logits, getattr(out, "aux_loss", None)

    def _inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs

    def chunks(self, stop: int | None = None) -> Iterator[slice]:
        """Consecutive position slices covering [0, stop) (default: every position), `chunk` long."""
        stop = self.input_ids.shape[1] if stop is None else stop
        for start in range(0, stop, self.chunk):
            yield slice(start, min(stop, start + self.chunk))

    def logits(self, positions: slice, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at `positions`: [b, c, V] in the model's dtype; `hidden` [b, L, d] replaces the
        kept final hidden states (the checkpointed loss passes its own input through here)."""
        if self.full is not None:
            return self.full[:, positions]
        hidden = self.hidden if hidden is None else hidden
        cached = _with_first(self.decoder_output, hidden)
        index = torch.arange(positions.start, positions.stop, device=self.input_ids.device)
        had = "forward" in self.decoder.__dict__  # e.g. accelerate's offload hooks set one per instance
        saved = self.decoder.__dict__.get("forward")
        self.decoder.forward = lambda *args, **kwargs: cached
        try:
            return self.inner(**self._inputs(), logits_to_keep=index).logits
        finally:
            if had:
                self.decoder.forward = saved
            else:
                del self.decoder.forward

    def chunk_sum(self, fn: Callable[[torch.Tensor, slice], torch.Tensor], stop: int | None = None) -> torch.Tensor:
        """Σ over chunks of positions < stop of fn(logits [b, c, V] float32, positions) -> scalar.

        With gradients on and more than one chunk, each chunk is checkpointed: backward recomputes
        its logits from h, so autograd keeps h [b, L, d], not every chunk's [b, c, V].
        """
        chunks = list(self.chunks(stop))
        total = None
        for positions in chunks:
            if self.full is None and len(chunks) > 1 and torch.is_grad_enabled():
                part = checkpoint(lambda h, p=positions: fn(self.logits(p, h).float(), p), self.hidden,
                                  use_reentrant=False)
            else:
                part = fn(self.logits(positions).float(), positions)
            total = part if total is None else total + part
        return total if total is not None else torch.zeros((), device=self.input_ids.device)

    def loss_sum(self, targets: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Σ over positions t < stop of CE(targets[:, t]) (−100 ignored), a float32 scalar (with a graph
        when gradients are on). targets [b, ≥stop] are each position's next token (already shifted)."""
        return self.chunk_sum(lambda logits, p: F.cross_entropy(  # [b·c, V]: contiguous rows, as transformers
            logits.flatten(0, 1), targets[:, p].flatten(), ignore_index=-100, reduction="sum"), stop)


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, chunk: int | None = None, router_aux: bool = True) -> torch.Tensor:
    """`model(input_ids, attention_mask, labels=labels).loss`, made chunk by chunk.

    As transformers' ForCausalLMLoss: the mean cross-entropy of labels[:, t+1] at positions t over
    the labels that are not −100 (labels default to input_ids), plus router_aux_loss_coef × the
    router load-balancing loss when a MoE forward makes one (output_router_logits) and `router_aux`.
    """
    labels = input_ids if labels is None else labels
    batch = BatchLogits(model, input_ids, attention_mask, chunk)
    targets = labels[:, 1:]  # [b, L-1]: position t predicts token t+1
    count = (targets != -100).sum()
    loss = batch.loss_sum(targets, stop=targets.shape[1]) / count
    if router_aux and batch.aux_loss is not None:
        coef = getattr(batch.inner, "router_aux_loss_coef", None)
        if coef is None:
            coef = getattr(getattr(batch.inner, "config", None), "router_aux_loss_coef", 0.0)
        loss = loss + coef * batch.aux_loss.to(loss.device)
    return loss
