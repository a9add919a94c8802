"""A model's blocks spread over several devices in one process (`--devices`), through accelerate.

For a model that does not fit on one GPU. The device map is simple and predictable: the first
device holds everything outside the repeated blocks (embeddings, final norm, LM head, rotary
tables: tied weights stay together) and each device a contiguous run of blocks, the runs
balanced by parameter count. accelerate's `dispatch_model` moves the weights and attaches an
AlignDevicesHook to every entry of the map: a block's hook moves its inputs (hidden states,
masks, position embeddings) to the block's device, and the top-level hook returns the outputs
to the device of the inputs. So calibration streams, the factorisations (each factor is built
on its layer's device) and perplexity run unchanged, as on one device, one block at a time:
the devices take turns, they do not work in parallel (that is what several processes are for).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.io.devices import check_device
from subspace_cli.walk import find_blocks

HEADROOM = 0.9  # the weights may take this fraction of a GPU's free memory; activations need the rest


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]
    device_map: dict[str, str]  # module path -> device, as accelerate's dispatch_model takes it
    blocks_per_device: tuple[tuple[str, int, int], ...]  # (device, first block, last block)

    @property
    def input_device(self) -> str:
        return self.devices[0]

    def note(self) -> str:
        runs = ", ".join(f"{d}: blocks {a}-{b}" for d, a, b in self.blocks_per_device)
        return f"blocks placed over {len(self.devices)} devices in one process ({runs}); the rest on {self.devices[0]}"


def parse_devices(spec: str) -> tuple[str, ...]:
    """`auto` (every visible GPU) or a comma-separated list (`cuda:0,cuda:1`); each one checked."""
    if spec.strip() == "auto":
        if not torch.cuda.is_available():
            check_device("cuda", f"--devices {spec}")  # raises, saying why torch sees no GPU
        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    else:
        devices = tuple(d.strip() for d in spec.split(","))
        if not all(devices):
            raise UsageError(f"--devices '{spec}': empty entry; pass 'auto' or a list such as cuda:0,cuda:1")
    for device in devices:
        check_device(device, f"--devices {spec}")
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if any(d.index is None for d in cuda):
        raise UsageError(f"--devices '{spec}': name each GPU with its index (cuda:0,cuda:1), or pass 'auto'")
    if len(set(cuda)) != len(cuda):
        raise UsageError(f"--devices '{spec}' names a GPU twice")
    if cuda and len(cuda) != len(devices):
        # accelerate would treat the non-GPU entries as offloaded (weights kept aside, moved in per
        # call), and compression replaces modules in place, which offloaded weights do not allow.
        raise UsageError(f"--devices '{spec}' mixes GPUs with other devices; list GPUs only, "
                         "or compress a model too large for them with --device cpu")
    return devices


def plan_placement(model: nn.Module, devices: tuple[str, ...], unit: int = 1) -> Placement:
    """Contiguous runs of blocks balanced by parameter count; everything else on devices[0].

    `unit` consecutive blocks always share a device (cospadi's group_size: the blocks of a group
    share one dictionary tensor)."""
    blocks = find_blocks(model)
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks.modules]
    total, n = sum(sizes), len(devices)
    device_map: dict[str, str] = {}
    runs: list[tuple[str, int, int]] = []
    done = 0  # parameters in the blocks already placed
    for start in range(0, len(sizes), unit):
        size = sum(sizes[start:start + unit])
        # the device whose share of the cumulative parameter count holds this unit's midpoint
        k = min(n - 1, int((done + size / 2) * n / max(total, 1)))
        last = min(start + unit, len(sizes)) - 1
        for i in range(start, last + 1):
            device_map[blocks.block_path(i)] = devices[k]
        if runs and runs[-1][0] == devices[k]:
            runs[-1] = (devices[k], runs[-1][1], last)
        else:
            runs.append((devices[k], start, last))
        done += size
    # Every other module on the path to the blocks goes to the first device, at the coarsest level.
    parts = blocks.path.split(".")
    for depth in range(len(parts)):
        parent = model.get_submodule(".".join(parts[:depth]))
        prefix = "".join(p + "." for p in parts[:depth])
        for name, child in parent.named_children():
            if name != parts[depth] and _has_tensors(child):
                device_map[prefix + name] = devices[0]
        if _has_tensors(parent, recurse=False):
            raise UsageError(f"{type(parent).__name__} keeps tensors of its own beside its blocks; "
                             "--devices cannot place it: use --device")
    return Placement(devices, device_map, tuple(runs))


def _has_tensors(module: nn.Module, recurse: bool = True) -> bool:
    return next(itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse)), None) is not None


def check_fits(model: nn.Module, placement: Placement) -> None:
    """Exit 2 before moving anything when a GPU's share of the weights exceeds its free memory."""
    need: dict[str, int] = {}
    for path, device in placement.device_map.items():
        module = model.get_submodule(path)
        size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        need[device] = need.get(device, 0) + size
    for device, size in need.items():
        if torch.device(device).type != "cuda":
            continue
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if size > HEADROOM * free:
            raise UsageError(f"--devices: {device} would hold {size / 2**30:.1f} GiB of weights but has "
                             f"{free / 2**30:.1f} GiB free; add GPUs to --devices, or use --device cpu")


def place_blocks(model: nn.Module, spec: str, unit: int = 1) -> Placement:
    """Dispatch a model loaded on the CPU over the devices of `spec`; returns what went where."""
    from accelerate import dispatch_model

    devices = parse_devices(spec)
    placement = plan_placement(model, devices, unit)
    check_fits(model, placement)
    # force_hooks: attach the hooks even when every entry is one device (cpu,cpu in the tests),
    # so the same code runs whatever the map holds.
    dispatch_model(model, placement.device_map, main_device=placement.input_device, force_hooks=True)
    return placement
