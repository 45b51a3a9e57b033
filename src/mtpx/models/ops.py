"""A hook through which a runner may compile the family files' small row-wise op groups, without the family files
knowing which runner, device or compiler is in use."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable

_compiler: Callable[[Callable], Callable] | None = None  # set by a runner around the passes it compiles


def fusible(fn: Callable) -> Callable:
    """Mark a group of small row-wise ops (a norm, the gates) that a runner may run compiled into one or two
    kernels. Outside `compiling()` `fn` runs as written."""
    compiled: dict[int, Callable] = {}

    @functools.wraps(fn)
    def run(*args):
        if _compiler is None:
            return fn(*args)
        key = id(_compiler)
        if key not in compiled:
            compiled[key] = _compiler(fn)
        return compiled[key](*args)
    return run


@contextmanager
def compiling(compiler: Callable[[Callable], Callable] | None):
    """Within this block, `fusible` op groups run through `compiler(fn)` (None: as written)."""
    global _compiler
    previous, _compiler = _compiler, compiler
    try:
        yield
    finally:
        _compiler = previous
