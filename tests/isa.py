"""Why a test of an instruction-set-specific kernel path cannot run here: it skips only where that path is absent
(this CPU lacks the instructions, this build of the kernels lacks the code, or a switch turns it off), with the
reason. Everything else runs on any x86-64 CPU, AVX2-only or AVX-512, with or without AMX.
`isa_levels()`: the kernels' instruction sets of this architecture as pytest parameters, each skipped where this CPU
lacks it; `running_on(level)`: the kernels run on that level inside the block."""
from __future__ import annotations

import contextlib
import os
import platform

import pytest
import torch

from mtpx import kernels

LEVELS = ("scalar", "neon") if platform.machine().lower() in ("aarch64", "arm64") else ("scalar", "avx2", "avx512",
                                                                                         "amx")


def isa_skip_reason(level: str) -> str | None:
    if not kernels.rowgemm_available():
        return "the CPU kernels are not built here (MTPX_ROWGEMM=0, or no compiler)"
    if level not in kernels.cpu_isas():
        return f"this CPU lacks {level} (it runs {', '.join(kernels.cpu_isas())})"
    return None


def isa_levels(levels=LEVELS) -> list:
    return [pytest.param(level, id=level, marks=pytest.mark.skipif(isa_skip_reason(level) is not None,
                                                                   reason=isa_skip_reason(level) or ""))
            for level in levels]


@contextlib.contextmanager
def running_on(level: str):
    before = kernels.isa()
    kernels.set_isa(level)
    try:
        yield
    finally:
        kernels.set_isa(before)


def amx_code_built() -> bool:
    """Whether the built kernels contain the AMX path (built for a CPU with AMX_BF16): their stub raises "this build
    has no AMX" before checking anything; the real one checks the shapes first, then whether AMX is usable."""
    if not kernels.rowgemm_available():
        return False
    try:
        kernels.rowgemm_tiles(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(1, 1, 16, 32, dtype=torch.bfloat16),
                              16)
    except RuntimeError as e:
        return "this build has no AMX" not in str(e)
    return True


def amx_skip_reason() -> str | None:
    """None where kernels.amx_available(), else why not."""
    if kernels.amx_available():
        return None
    if not kernels.rowgemm_available():
        return "no AMX: the CPU kernels are not built here (MTPX_ROWGEMM=0, or no compiler)"
    if not {"amx_tile", "amx_bf16"} <= kernels.cpu_flags():
        return "no AMX: this CPU lacks AMX_BF16 / AMX_TILE"
    if not amx_code_built():
        return "no AMX: the kernels were built without it (a compiler older than GCC 11, or clang)"
    if os.environ.get("MTPX_AMX") == "0":
        return "no AMX: MTPX_AMX=0 turns it off"
    if "amx" in kernels.cpu_isas():
        return f"no AMX: the kernels run on {kernels.isa()} (MTPX_CPU_ISA)"
    return "no AMX: the OS does not grant this process AMX tile state"
