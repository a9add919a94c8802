"""`--device` checked against what torch can reach, before any weights are read.

Without this a CUDA device on a CPU-only build fails deep inside transformers' loader with an
AssertionError (exit 1 and a traceback), or an index past the last GPU with a CUDA error.
"""

from __future__ import annotations

from subspace_cli.errors import UsageError


def check_device(name: str) -> None:
    """Exit 2 unless torch can place tensors on `name` (cpu, cuda, cuda:N, mps, xpu:N, meta ...)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device '{name}' is not a torch device ({exc}); valid: cpu, cuda, cuda:N, mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
            raise UsageError(f"--device {name}: {why} (torch {torch.__version__}); pass --device cpu, "
                             "or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine; pass --device cpu")
