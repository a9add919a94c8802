"""Find the repeated blocks of a model and the Linear-like layers inside them, generically.

No per-architecture table: the blocks are the largest `nn.ModuleList` whose children share one
class and contain Linear (or GPT-2 `Conv1D`) layers. Works for Llama decoders, GPT-2 and BERT
encoders alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.walk.weights import is_linear_like


@dataclass
class Blocks:
    path: str  # dotted path of the ModuleList, e.g. "model.layers"
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def block_path(self, i: int) -> str:
        return f"{self.path}.{i}"


def find_blocks(model: nn.Module) -> Blocks:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear_like(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UsageError(
            f"found no repeated blocks with Linear layers in {type(model).__name__} ({_modules_seen(model)}); "
            "subspace supports models whose layers are an nn.ModuleList of same-class blocks holding nn.Linear "
            "(or GPT-2 Conv1D) layers"
        )
    return Blocks(path=best[1], modules=best[2])


def _first(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


def _modules_seen(model: nn.Module) -> str:
    """What find_blocks looked at, for its error: each ModuleList's block classes (and why they do
    not qualify), then the model's own children, e.g. `ModuleLists: encoder.stages = 2 × ResNetStage
    (no Linear); children: embedder: ResNetEmbeddings, encoder: ResNetEncoder`."""
    lists = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        classes = sorted({type(child).__name__ for child in module})
        why = "empty" if not classes else "mixed classes" if len(classes) > 1 else "no Linear"
        lists.append(f"{name or '(root)'} = {len(module)} × {'/'.join(classes) or '-'} ({why})")
    children = [f"{name}: {type(child).__name__}" for name, child in model.named_children()]
    return (f"ModuleLists: {_first(lists) if lists else 'none'}; "
            f"children: {_first(children) if children else 'none'}")


def block_linears(
    block: nn.Module, prefix: str, targets: str | None = None, exclude: str | None = None
) -> dict[str, nn.Module]:
    """Linear-like layers of one block as {full dotted path: module}, filtered by regexes."""
    found = {}
    for name, module in block.named_modules():
        if not is_linear_like(module):
            continue
        full = f"{prefix}.{name}"
        if targets and not re.search(targets, full):
            continue
        if exclude and re.search(exclude, full):
            continue
        found[full] = module
    return found


def linear_names(blocks: Blocks, index: int) -> list[str]:
    """The Linear layers of block `index` by their last two path components (mlp.down_proj, ...), for messages."""
    return sorted({p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1]
                   for p in block_linears(blocks.modules[index], blocks.block_path(index))})


def compile_pattern(pattern: str | None, flag: str) -> str | None:
    """Validate a user regex early so a typo fails with exit 2, not mid-run."""
    if pattern is None:
        return None
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{flag} '{pattern}' is not a valid regular expression: {exc}") from exc
    return pattern
