"""The NEON matmul (src/mtpx/kernels/gemm_core.h) checked without ARM hardware: gemm_harness.cpp, built for aarch64
with Debian's cross compiler and run under qemu-user, compares NEON's bits with the scalar loops' for bf16, int8
and int4 weights at 1..8 rows. Skipped only where the cross toolchain or qemu is absent (apt-get install
g++-aarch64-linux-gnu qemu-user)."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "src" / "mtpx" / "kernels"
CROSS = "aarch64-linux-gnu-g++"
QEMU = next((q for q in ("qemu-aarch64", "qemu-aarch64-static") if shutil.which(q)), None)
NATIVE = platform.machine().lower() in ("aarch64", "arm64")


def _skip_reason() -> str | None:
    if NATIVE:
        return None if shutil.which("g++") else "no g++ to build the harness"
    missing = [name for name, found in ((CROSS, shutil.which(CROSS)), ("qemu-aarch64", QEMU)) if not found]
    if missing:
        return f"no {' or '.join(missing)} here (apt-get install g++-aarch64-linux-gnu qemu-user)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_neon_matmul_gives_the_scalar_bits_at_every_row_count(tmp_path):
    exe = tmp_path / "gemm_harness"
    compiler = "g++" if NATIVE else CROSS
    build = subprocess.run([compiler, "-std=c++17", "-O2", "-static", f"-I{KERNELS}", str(HERE / "gemm_harness.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)] if NATIVE else [QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr
