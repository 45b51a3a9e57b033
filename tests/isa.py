"""Why a test of an instruction-set-specific kernel path cannot run here: it skips only where that path is absent
(this CPU lacks the instructions, this build of the kernels lacks the code, or a switch turns it off), with the
reason. Everything else runs on any x86-64 CPU, AVX2-only or AVX-512, with or without AMX."""
from __future__ import annotations

import os

import torch

from mtpx import kernels


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
        return f"no AMX: the kernels were built without it (-march={os.environ.get('MTPX_KERNEL_MARCH', 'native')})"
    if os.environ.get("MTPX_AMX") == "0":
        return "no AMX: MTPX_AMX=0 turns it off"
    return "no AMX: the OS does not grant this process AMX tile state"
