"""`--device` checked against what torch can reach, before any weights are read.

Without this a CUDA device on a CPU-only build fails deep inside transformers' loader with an
AssertionError (exit 1 and a traceback), or an index past the last GPU with a CUDA error.
"""

from __future__ import annotations

from subspace_cli.errors import UsageError


def check_device(name: str, given: str | None = None) -> None:
    """Exit 2 unless torch can place tensors on `name` (cpu, cuda, cuda:N, mps, xpu:N, meta ...).

    `given` is how the user asked for it, for the message: `--devices auto` rather than `--device cuda`.
    """
    import torch

    given = given or f"--device {name}"
    instead = "drop --devices to run on one device (--device cpu)" if given.startswith("--devices") else "pass --device cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{given}: '{name}' is not a torch device ({exc}); valid: cpu, cuda, cuda:N, mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
            raise UsageError(f"{given}: {why} (torch {torch.__version__}); {instead}, "
                             "or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{given}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{given}: MPS is not available on this machine; {instead}")
