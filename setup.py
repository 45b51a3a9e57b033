"""Builds mtpx's CPU kernels (src/mtpx/kernels/) as the compiled extension mtpx.kernels._C when mtpx is installed,
so nothing compiles at run time and environments never share (or rebuild) each other's kernels. Everything else
about the package is in pyproject.toml.

One build holds every instruction set of its architecture, chosen at load (kernels/dispatch.cpp). Where the build
cannot run (no C++ compiler, no PyTorch to build against) the install still succeeds without the extension: mtpx
then compiles the kernels on first use, or, where that fails too, warns once and runs on PyTorch ops. In CI
(MTPX_REQUIRE_KERNELS=1, or CI set) a failed build fails the install.
An editable install (`pip install --no-build-isolation -e .`) builds the extension in place, beside the sources;
mtpx compares the sources' hash it was built from with the sources at load, and compiles afresh where they differ.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

KERNELS = Path("src") / "mtpx" / "kernels"
_spec = importlib.util.spec_from_file_location("_mtpx_kernel_sources", Path(__file__).parent / KERNELS / "sources.py")
sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources)


def _say(message: str) -> None:
    print(f"mtpx: {message}", file=sys.stderr, flush=True)


def _skip(reason: str) -> None:
    if sources.kernels_required():
        raise SystemExit(f"mtpx: the CPU kernels did not build, and they are required here (MTPX_REQUIRE_KERNELS=1, "
                         f"or CI set): {reason}")
    _say(f"installing without the compiled CPU kernels ({reason}); mtpx will try to compile them on first use, "
         "else run on PyTorch ops, several times slower. For the fast path install a C++ compiler (g++, or clang "
         "with OpenMP) and reinstall.")


def extensions() -> list:
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as e:
        _skip(f"PyTorch is not importable at build time: {e}")
        return []
    return [CppExtension(
        sources.EXTENSION, [str(KERNELS / f) for f in sources.SOURCES],
        extra_compile_args=list(sources.CFLAGS) + [f"-DMTPX_SOURCE_HASH={sources.source_hash()}"],
        extra_link_args=list(sources.LDFLAGS))]


def build_ext_class():
    """PyTorch's BuildExtension (its compiler flags, ninja where installed), made optional: a failed compile leaves
    the package installable (see the module docstring)."""
    try:  # pip's ninja, also where the environment is not activated: parallel compiles
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        base = build_ext
    else:
        base = BuildExtension.with_options(no_python_abi_suffix=False)

    class OptionalBuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - no compiler, a compile error: install without the extension
                _skip(f"{type(e).__name__}: {e}")

        def build_extension(self, ext):
            _say("compiling the CPU kernels (once per install, ~1-3 min)")
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                _skip(f"{type(e).__name__}: {e}")

    return OptionalBuildExt


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})
