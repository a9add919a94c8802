"""Stream calibration activations block by block.

`BlockStream` captures what every repeated block receives: the hidden states entering the first
block, and each block's own positional arguments and kwargs (masks, rotary embeddings, ...). Those
differ between blocks in hybrid models (sliding-window and global layers get their own masks and
rotary tables: Gemma 2/3, Mistral-style windows), so they are recorded per block, not replayed from
block 0. The capture runs the model with every block replaced by a recorder that passes the hidden
states through unchanged, so it costs the embeddings and mask building only, and it stops before
the final norm and LM head. The hidden states then move through one block at a time; only one
block's activations live at once: n_batches × (B, L, hidden).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from subspace_cli.linalg.gram import GramStats
from subspace_cli.walk import Blocks, block_linears, find_blocks, in_out_features, weight_matrix


class _Captured(Exception):
    pass


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockCall:
    """How the model called one block on one batch, less the hidden states themselves."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool = False  # the model passed `hidden_states=` rather than positionally

    def __call__(self, block: nn.Module, hidden: torch.Tensor):
        if self.hidden_as_kwarg:
            return block(*self.args, hidden_states=hidden, **self.kwargs)
        return block(hidden, *self.args, **self.kwargs)


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs, hidden_as_kwarg=True)


@contextmanager
def _replaced_forwards(blocks: list[nn.Module], forwards: list) -> Iterator[None]:
    """Each block's `forward` swapped for a stand-in (an instance attribute, as accelerate's hooks are)."""
    saved = [block.__dict__.get("forward") for block in blocks]
    for block, forward in zip(blocks, forwards):
        block.forward = forward
    try:
        yield
    finally:
        for block, previous in zip(blocks, saved):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


class BlockStream:
    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, device: str = "cpu"):
        self.model = model
        self.blocks: Blocks = find_blocks(model)
        self.device = device
        self.hidden: list[torch.Tensor] = []  # per batch (B, L, hidden)
        self.calls: list[list[BlockCall]] = [[] for _ in self.blocks.modules]  # per block, per batch
        self._capture(input_ids, batch_size)

    def _batches(self, input_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, input_ids.shape[0], batch_size):
            yield input_ids[start : start + batch_size].to(self.device)

    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor, batch_size: int) -> None:
        if input_ids.shape[0] == 0:
            return  # this process's share of the samples is empty (more processes than samples)
        blocks = list(self.blocks.modules)
        passthrough = self._passthrough(input_ids[:batch_size].to(self.device))

        def recorder(index: int):
            def forward(*args, **kwargs):
                hidden, call = _split_call(args, kwargs)
                if index == 0:
                    self.hidden.append(hidden.detach())
                self.calls[index].append(call)
                if index == len(blocks) - 1:
                    raise _Captured  # the last block's inputs are known: skip the norm and LM head
                return passthrough(hidden)

            return forward

        with _replaced_forwards(blocks, [recorder(i) for i in range(len(blocks))]):
            self.run_until_captured(self._batches(input_ids, batch_size))

    def run_until_captured(self, batches: Iterator[torch.Tensor]) -> None:
        """The model's forward on each batch, stopped where a hook raises `_Captured`."""
        for batch in batches:
            try:
                self.model(input_ids=batch, use_cache=False)
            except _Captured:
                pass

    def _passthrough(self, batch: torch.Tensor):
        """What a stand-in block returns: its input, in the structure the real block returns (a tensor
        in current transformers, a tuple whose first item is the hidden states in older ones)."""
        first = self.blocks.modules[0]
        seen: list = []

        def grab(module, args, kwargs):
            seen.append(_split_call(args, kwargs))
            raise _Captured

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(input_ids=batch, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        hidden, call = seen[0]
        sample = call(first, hidden)  # one real block forward on one batch
        if isinstance(sample, (tuple, list)):
            rest = tuple(sample[1:])
            return lambda h: (h, *rest)
        return lambda h: h

    @torch.no_grad()
    def run_block(self, index: int) -> list[torch.Tensor]:
        """Outputs of block `index` for every batch, from the current hidden states."""
        block = self.blocks.modules[index]
        return [_first_output(call(block, h)) for h, call in zip(self.hidden, self.calls[index])]

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs


@contextmanager
def record_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, GramStats]]:
    """Forward hooks that accumulate each module's input statistics while the block runs.

    Layers fed the very same tensor (q/k/v projections, gate/up) share one GramStats: the
    Gram is the costliest part of calibration, so it is computed once per distinct input.
    Each GramStats lives on its layer's device (blocks may sit on different GPUs, `--devices`).
    """
    stats = {name: GramStats(in_out_features(m)[0], device=weight_matrix(m).device) for name, m in modules.items()}
    owner_of: dict[str, str] = {}  # layer -> layer whose identical input it shares
    seen: dict[tuple, tuple[weakref.ref, str]] = {}  # input address -> (the tensor, first layer)

    def hook(module, args, out, name):
        x = args[0]
        key = (x.data_ptr(), tuple(x.shape), x.stride())
        previous = seen.get(key)
        if previous is not None and previous[0]() is x:  # the same live tensor, not a reused address
            if previous[1] != name:
                owner_of[name] = previous[1]
                return
        else:
            seen[key] = (weakref.ref(x), name)
        stats[name].update(x.detach())

    handles = [m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n)) for name, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        for name, first in owner_of.items():
            stats[name] = stats[first]


@torch.no_grad()
def record_head_inputs(stream: BlockStream, input_ids: torch.Tensor, batch_size: int, head: nn.Module) -> GramStats:
    """Input statistics of the LM head: the model's final norm applied to the last block's outputs,
    which `stream.hidden` holds once every block has been run and advanced.

    The model runs once more per batch with every block replaced by a stand-in (the earlier ones
    pass their input through, the last returns the streamed output), so this costs the embeddings,
    the masks and the final norm; a pre-hook on the head stops each pass before the [B, L, V]
    logits are formed. A head the model does not call as a module records no tokens.
    """
    stats = GramStats(in_out_features(head)[0], device=weight_matrix(head).device)
    if input_ids.shape[0] == 0:
        return stats
    blocks = list(stream.blocks.modules)
    wrap = stream._passthrough(input_ids[:batch_size].to(stream.device))  # the structure blocks return
    finals = iter(stream.hidden)  # per batch (B, L, hidden)

    def stand_in(index: int):
        def forward(*args, **kwargs):
            hidden, _ = _split_call(args, kwargs)
            return wrap(next(finals) if index == len(blocks) - 1 else hidden)

        return forward

    def grab(module, args):
        stats.update(args[0].detach())
        raise _Captured

    handle = head.register_forward_pre_hook(grab)
    try:
        with _replaced_forwards(blocks, [stand_in(i) for i in range(len(blocks))]):
            stream.run_until_captured(stream._batches(input_ids, batch_size))
    finally:
        handle.remove()
    return stats


@torch.no_grad()
def collect_dense_grams(
    model: nn.Module, input_ids: torch.Tensor, *, targets: str | None = None, exclude: str | None = None,
    device: str = "cpu", batch_size: int = 8,
) -> dict[str, GramStats]:
    """Input statistics of every targeted layer of the unmodified model (one-shot)."""
    stream = BlockStream(model, input_ids, batch_size=batch_size, device=device)
    all_stats: dict[str, GramStats] = {}
    for i, block in enumerate(stream.blocks.modules):
        layers = block_linears(block, stream.blocks.block_path(i), targets, exclude)
        with record_inputs(layers) as stats:
            outputs = stream.run_block(i)
        all_stats.update(stats)
        stream.advance(outputs)
    return all_stats
