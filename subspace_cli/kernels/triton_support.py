"""What every Triton kernel here shares: is triton importable, is a kernel interpreted, grid math.

Triton is an optional extra, so nothing in this module imports it at import time.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting(kernel) -> bool:
    """True when `kernel` runs in the CPU interpreter (TRITON_INTERPRET=1 when it was defined)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
