"""One DoRA layer, forward + backward: `dora` (factored norm, fused compose) vs PEFT's DoRA layer.

Both wrap the same frozen Linear W [out, in] with the same A [r, in], random nonzero B [out, r] and
magnitude, in training mode, on an input x [rows, in] that needs its gradient (as mid-network).
Adapter tensors are fp32 as `get_peft_model` makes them; the base is bf16 on CUDA, fp32 on CPU.
The two are timed interleaved in one process (median of --repeats after warm-up). Memory: on CUDA
the peak of torch.cuda.max_memory_allocated above the resident tensors; on CPU the peak of the
running sum of the profiler's allocation and free events (`profile_memory=True`); everywhere, the
largest single tensor and the sum of every tensor allocated during one step (at the dispatcher).

    python benchmarks/dora_speed.py                                   # CUDA: 4096×4096, rank 16, 2048 rows
    python benchmarks/dora_speed.py --out 1024 --in 1024 --rows 256 --threads 1   # the CPU run reported

On a CPU shared with other jobs use --threads 1: two OpenMP threads competing for busy cores ran
the same step 18× slower here, which measures the contention, not the layers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from subspace_cli.methods.adapt.dora import DoraLayer
from subspace_cli.methods.adapt.lora_family import LoraConfig

MIB = 2**20


class _Allocations(TorchDispatchMode):
    """Bytes of each tensor an op allocates (outputs that are views of an input excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self.sizes += [t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def build(args, device):
    import peft

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = nn.Linear(args.inp, args.out, bias=False).to(device, dtype)
    ours = DoraLayer(base, args.rank, 2.0 * args.rank, LoraConfig(), torch.Generator().manual_seed(0))
    holder = nn.Module()
    holder.lin = nn.Linear(args.inp, args.out, bias=False).to(device, dtype)
    holder.lin.weight.data.copy_(base.weight)
    peft.inject_adapter_in_model(
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["lin"], use_dora=True), holder)
    theirs = holder.lin
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.02)
        for name, mine in (("lora_A", ours.lora_A), ("lora_B", ours.lora_B), ("lora_magnitude_vector", ours.magnitude)):
            module = getattr(theirs, name)["default"]
            module.weight = nn.Parameter(mine.detach().clone())  # fp32, as get_peft_model's autocast leaves them
    ours.train(), theirs.train()
    x = torch.randn(args.rows, args.inp, device=device, dtype=dtype)
    grad = torch.randn(args.rows, args.out, device=device, dtype=dtype)
    return {"dora": ours, "PEFT DoRA": theirs}, x, grad


def step(layer, x, grad):
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y


def cpu_peak_mib(layer, x, grad) -> float:
    """Peak bytes alive during one step above those alive before it, from the CPU allocator's events."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(layer, x, grad)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.load(open(f"{tmp}/trace.json"))["traceEvents"]
    live = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]  # negative for a free
        peak = max(peak, live)
    return peak / MIB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(layers, x, grad, device, repeats):
    for layer in layers.values():  # warm-up (Triton compile and autotune, allocator)
        for _ in range(3):
            step(layer, x, grad)
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():  # interleaved, so drift hits both
            sync(device)
            start = time.perf_counter()
            step(layer, x, grad)
            sync(device)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, layer in layers.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            step(layer, x, grad)
            peak = (torch.cuda.max_memory_allocated() - resident) / MIB
        else:
            peak = cpu_peak_mib(layer, x, grad)
        with _Allocations() as record:
            step(layer, x, grad)
        rows[name] = dict(ms=1e3 * statistics.median(times[name]), peak=peak,
                          largest=max(record.sizes) / MIB, total=sum(record.sizes) / MIB)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--out", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--in", dest="inp", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2048 if cuda else 256, help="batch × sequence")
    parser.add_argument("--repeats", type=int, default=50 if cuda else 20)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    layers, x, grad = build(args, device)
    with torch.no_grad():
        ours, theirs = layers["dora"](x), layers["PEFT DoRA"](x)
    diff = float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max())
    rows = measure(layers, x, grad, device, args.repeats)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"W {args.out}×{args.inp} {x.dtype}, rank {args.rank}, {args.rows} rows; {where}; "
          f"torch {torch.__version__}")
    print("\n| layer | fwd+bwd ms (median) | time / PEFT | peak MiB | peak / PEFT | largest tensor MiB | allocated MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    peft_row = rows["PEFT DoRA"]
    for name, r in rows.items():
        print(f"| {name} | {r['ms']:.2f} | {r['ms'] / peft_row['ms']:.2f}× | {r['peak']:.1f} | "
              f"{r['peak'] / peft_row['peak']:.2f}× | {r['largest']:.2f} | {r['total']:.1f} |")
    print(f"\nmax |y_dora − y_peft| / max |y_peft| = {diff:.1e}")


if __name__ == "__main__":
    main()
