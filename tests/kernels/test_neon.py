"""The NEON kernels checked without ARM hardware, built for aarch64 with Debian's cross compiler and run under
qemu-user: gemm_harness.cpp compares the matmul's NEON bits with the scalar loops' for bf16, int8 and int4 weights at
1..8 rows; step_harness.cpp checks that the step ops (Gated DeltaNet layer, gated attention) give, position by
position, the bits of one-position steps, that a replay gives the state after n steps, at 1 and 3 threads, with NEON
and scalar builds alike. Skipped only where the cross toolchain or qemu is absent (apt-get install
g++-aarch64-linux-gnu qemu-user)."""
import os
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


def _missing() -> str | None:
    if NATIVE:
        return None if shutil.which("g++") else "no g++ to build the harness"
    missing = [name for name, found in ((CROSS, shutil.which(CROSS)), ("qemu-aarch64", QEMU)) if not found]
    return f"no {' or '.join(missing)} here (apt-get install g++-aarch64-linux-gnu qemu-user)" if missing else None


def _skip_reason() -> str | None:
    """Why the tests skip; None in CI (MTPX_REQUIRE_QEMU=1, .ci/run installs the tools), where they fail instead."""
    return None if os.environ.get("MTPX_REQUIRE_QEMU") == "1" else _missing()


def _build_and_run(tmp_path: Path, source: str, flags: list[str]) -> None:
    if _missing() is not None:
        pytest.fail(_missing(), pytrace=False)
    exe = tmp_path / Path(source).stem
    compiler = "g++" if NATIVE else CROSS
    build = subprocess.run([compiler, "-std=c++17", *flags, "-static", f"-I{KERNELS}", str(HERE / source), "-o",
                            str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)] if NATIVE else [QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_neon_matmul_gives_the_scalar_bits_at_every_row_count(tmp_path):
    _build_and_run(tmp_path, "gemm_harness.cpp", ["-O2"])


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_neon_step_ops_give_a_steps_bits_at_every_position_count(tmp_path):
    _build_and_run(tmp_path, "step_harness.cpp", ["-O3", "-pthread"])  # -O3: the extension's flags
