"""Several processes for the compress verb: calibration samples split, statistics summed.

Under `accelerate launch` or `torchrun`, each of the P processes holds the whole model and
propagates only its share of the calibration samples. Every statistic averaged over the data
is kept as a sum plus a count (float64 Grams Σ x xᵀ, Σ |x|, token counts, NLL sums), and the sums
are all-reduced over the processes before they are used, so each process fits the factors that
one process fed every sample would fit (up to float reassociation) and all processes fit the
same ones. With one process nothing here touches torch.distributed.

accelerate's PartialState initialises the process group from the launcher's environment
(gloo on CPU, nccl on GPUs). Note that `accelerate launch --cpu --num_processes N` starts one
process (accelerate runs several CPU processes only through mpirun); launch CPU runs with
`torchrun --nproc-per-node N` or `accelerate launch --multi_gpu --num_processes N`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from subspace_cli.errors import UsageError
from subspace_cli.linalg.gram import GramStats

# What launchers set for the number of processes (torchrun / accelerate, then MPI flavours),
# the variables accelerate's PartialState itself reads.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones; the default is a single process."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0  # index among the processes on this machine: picks the GPU
    local_world: int = 1  # processes on this machine

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of `rows` [n, ...]: shares differ by at most one row
        (n need not divide evenly), and are empty for the last processes when n < world."""
        if not self.distributed:
            return rows
        return torch.tensor_split(rows, self.world)[self.rank]

    def device(self, device: str) -> str:
        """`cuda` means this process's own GPU, cuda:LOCAL_RANK; any other device is kept."""
        if not self.distributed or not device.startswith("cuda"):
            return device
        if device != "cuda":
            # nccl refuses two processes on one GPU, and which GPU is whose is the launcher's business.
            raise UsageError(f"--device {device} names one GPU for all {self.world} processes; pass --device cuda "
                             "(each process takes cuda:LOCAL_RANK)")
        available = torch.cuda.device_count()
        if self.local_world > available:  # checked by every process, so all of them stop
            raise UsageError(f"--device cuda gives each process its own GPU, but {self.local_world} processes on this "
                             f"machine find {available} GPU(s); launch one process per GPU "
                             "(or run on the CPU with --device cpu)")
        return f"cuda:{self.local_rank}"

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `tensor` in place over the processes; returns it."""
        return self._all_reduce_(tensor, "sum")

    def _all_reduce_(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            # nccl reduces only GPU tensors (a group opened on the GPUs, CPU statistics): go through this GPU.
            moved = tensor.to(f"cuda:{self.local_rank}")
            dist.all_reduce(moved, op=reduce_op)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor, op=reduce_op)
        return tensor

    def input_groups(self, stats: dict[str, GramStats]) -> list[list[str]]:
        """Layers fed the very same input tensor (they share one GramStats: q/k/v, gate/up) in any
        process, as lists of names in `stats` order. Call it before `sum_stats_`, which may stop
        the sharing; a process that saw no samples learns the groups from the others, so every
        process (and a run with one process) finds the same groups."""
        names = list(stats)
        first: dict[int, int] = {}
        owners = torch.tensor([float(first.setdefault(id(stats[n]), i)) for i, n in enumerate(names)],
                              dtype=torch.float64)  # [layers]: index of the first layer sharing its object
        owners = -self._all_reduce_(-owners, "max")  # the smallest over processes: shared anywhere
        groups: dict[float, list[str]] = {}
        for name, owner in zip(names, owners.tolist()):
            groups.setdefault(owner, []).append(name)
        return [group for group in groups.values() if len(group) > 1]

    def sum_stats_(self, stats: dict[str, GramStats]) -> None:
        """Sum every layer's Gram, |x| sum and token count over the processes (in place).

        Layers fed the same input share one GramStats object (q/k/v, gate/up): each object is
        reduced once, or its sums would be counted once per layer sharing it. That sharing is
        found at run time, so a process that saw no samples (fewer samples than processes) has
        none; when the processes disagree, each layer's own copy is reduced instead (correct
        either way, more traffic). Every process passes the same layer names in the same order.
        """
        if not self.distributed or not stats:
            return
        names = list(stats)
        first: dict[int, int] = {}
        owners = torch.tensor([float(first.setdefault(id(stats[n]), i)) for i, n in enumerate(names)],
                              dtype=torch.float64)  # [layers]: index of the first layer sharing its object
        bounds = self._all_reduce_(torch.cat([owners, -owners]), "max")  # [max owners, -min owners]
        if not torch.equal(bounds[:len(names)], -bounds[len(names):]):
            for n in names:
                stats[n] = GramStats(stats[n].gram.shape[0], device=stats[n].gram.device).merge_(stats[n])
        unique = list({id(s): s for s in stats.values()}.values())
        for s in unique:
            self.sum_(s.gram)  # [in, in] float64
        # The small vectors travel in one call: [Σ in + one count per object] float64 (counts exact below 2^53).
        small = torch.cat([torch.cat([s.abs_sum, s.abs_sum.new_tensor([float(s.n_tokens)])]) for s in unique])
        self.sum_(small)
        offset = 0
        for s in unique:
            width = s.abs_sum.numel()
            s.abs_sum.copy_(small[offset:offset + width])
            s.n_tokens = int(small[offset + width].item())
            offset += width + 1

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The main process's `tensor` on every process (same shape and dtype everywhere)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else tensor.device
        moved = tensor.to(device).contiguous()
        dist.broadcast(moved, src=0)
        return moved.to(tensor.device)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def current_processes(device: str = "cpu") -> Processes:
    """The launched processes; a single process, without importing accelerate, when none was launched.

    The backend follows `device`: nccl for `cuda...`, otherwise gloo (MPI where torch has it).
    accelerate only picks gloo when told the run is on the CPU: under torchrun, or `accelerate
    launch --multi_gpu`, a plain PartialState() on a machine without GPUs reports one process.
    """
    launched = max(int(os.environ.get(var, "1") or "1") for var in _WORLD_SIZE_VARS)
    if launched <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))  # initialises torch.distributed from the environment
    if state.num_processes <= 1:
        # Going on would run `launched` independent copies, all writing the same --out.
        raise UsageError(f"launched as {launched} processes, but accelerate opened no process group for --device "
                         f"{device} (no GPU visible?); pass --device cpu, or launch one process")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))  # torchrun and accelerate set it
    return Processes(world=state.num_processes, rank=state.process_index, local_rank=state.local_process_index,
                     local_world=local_world)
