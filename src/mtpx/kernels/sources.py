"""The CPU kernels' sources and build settings, one place for setup.py (the build at install) and kernels/__init__.py
(the build on first use where the installed package has none). Imports nothing of mtpx or torch: setup.py loads this
file by path."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
# compiled, in this order; the instruction sets' object files are built from one body each (isa_*.cpp)
SOURCES = ("dispatch.cpp", "isa_scalar.cpp", "isa_avx2.cpp", "isa_avx512.cpp", "isa_neon.cpp", "layer_step.cpp",
           "bindings.cpp")
HEADERS = ("kernels.h", "kernel_decls.h", "isa_names.h", "isa_prelude.h", "isa_body.h", "gemm_types.h", "gemm_core.h",
           "rowgemm_isa.h", "step_core_isa.h", "step_ops_isa.h")
EXTENSION = "mtpx.kernels._C"
# no -march: the baseline CPU; each instruction set's code is compiled for it by target pragmas (isa_*.cpp)
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def source_hash(directory: Path = HERE) -> str:
    """A hash of the sources: compiled into the extension (MTPX_SOURCE_HASH), and compared at load with the sources
    beside it, so an extension built from other sources (an editable install edited since) is never used."""
    h = hashlib.sha1()
    for name in sorted(SOURCES + HEADERS):
        h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def kernels_required() -> bool:
    """Whether a failed kernel build is an error rather than a fallback: MTPX_REQUIRE_KERNELS=1 (0: never), or, where
    that is unset, the CI variable that CI services set."""
    explicit = os.environ.get("MTPX_REQUIRE_KERNELS")
    return truthy(explicit) if explicit is not None else truthy(os.environ.get("CI", ""))
