"""What every Triton kernel here shares: is triton importable, which path an op takes, grid math.

Triton is an optional extra, so nothing in this module imports it at import time.

Dispatch rule of the `subspace::` ops: the Triton kernel for CUDA tensors when triton imports,
the torch reference otherwise. CPU tensors take the kernel only inside `interpret_on_cpu()`
(tests, with TRITON_INTERPRET=1 set before the kernels are defined), and then only real
tensors: fake and functional tensors seen while tracing have no memory for the interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_cpu_interpreter = False  # set by interpret_on_cpu()


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_requested() -> bool:
    """TRITON_INTERPRET=1 in the environment: kernels defined now run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreting(kernel) -> bool:
    """True when `kernel` (a jit function or an autotuner around one) runs in the CPU interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
        kernel = kernel.fn  # Autotuner / Heuristics wrap the jit function
    return isinstance(kernel, InterpretedFunction)


def autotune_configs(configs: list) -> list:
    """The autotune list, or only its first entry in the interpreter, which cannot time kernels."""
    return configs[:1] if interpret_requested() else configs


def n_bucket(n) -> int:
    """Autotune key for the row count: 16, 128, 1024 or 8192, so a new N seldom re-tunes.

    A symbolic N (torch.compile with dynamic shapes) is passed through: Inductor tunes by itself.
    """
    if not isinstance(n, int):
        return n
    return next((b for b in (16, 128, 1024) if n <= b), 8192)


@contextlib.contextmanager
def interpret_on_cpu():
    """Within the block, the ops run their Triton kernel on CPU tensors in the interpreter.

    For tests: needs TRITON_INTERPRET=1 before the kernel modules are imported.
    """
    global _cpu_interpreter
    if not (triton_available() and interpret_requested()):
        raise RuntimeError("interpret_on_cpu needs triton and TRITON_INTERPRET=1 set before the kernels import")
    previous, _cpu_interpreter = _cpu_interpreter, True
    try:
        yield
    finally:
        _cpu_interpreter = previous


def use_triton(t: torch.Tensor, kernel) -> bool:
    """Whether an op on `t` runs `kernel` (None without triton); see the module docstring."""
    if kernel is None:
        return False
    if interpreting(kernel):
        # Only real CPU tensors (a Parameter is one): the interpreter reads their memory.
        return _cpu_interpreter and t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter)
    return t.is_cuda


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def define_op(name: str, impl):
    """The custom op `name` ("subspace::...") running `impl`: a `triton_op` where triton imports, so
    torch.compile sees (and Inductor can fuse) the kernel launch; a plain `custom_op` otherwise."""
    if triton_available():
        return torch.library.triton_op(name, impl, mutates_args=())
    return torch.library.custom_op(name, impl, mutates_args=())
