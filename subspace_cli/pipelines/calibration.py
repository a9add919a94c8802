"""Stream calibration activations block by block.

`BlockStream` captures what the first repeated block receives (hidden states plus the
positional arguments and kwargs the model passes: masks, rotary embeddings, ...), then moves
those hidden states through one block at a time. Only one block's activations live at once:
n_batches × (B, L, hidden).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from subspace_cli.io.discovery import Blocks, block_linears, find_blocks, in_out_features, weight_matrix
from subspace_cli.linalg.gram import GramStats


class _Captured(Exception):
    pass


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockStream:
    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, device: str = "cpu"):
        self.model = model
        self.blocks: Blocks = find_blocks(model)
        self.device = device
        self.hidden: list[torch.Tensor] = []  # per batch (B, L, hidden)
        self.extra: list[tuple[tuple, dict]] = []  # per batch: (args after hidden, kwargs)
        self._capture(input_ids, batch_size)

    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor, batch_size: int) -> None:
        first = self.blocks.modules[0]

        def grab(module, args, kwargs):
            self.hidden.append(args[0].detach())
            self.extra.append((tuple(args[1:]), dict(kwargs)))
            raise _Captured

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(self.device)
                try:
                    self.model(input_ids=batch, use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()

    @torch.no_grad()
    def run_block(self, index: int) -> list[torch.Tensor]:
        """Outputs of block `index` for every batch, from the current hidden states."""
        block = self.blocks.modules[index]
        return [
            _first_output(block(h, *args, **kwargs))
            for h, (args, kwargs) in zip(self.hidden, self.extra)
        ]

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
