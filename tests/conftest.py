import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# tiny test models: a second thread only adds sync stalls (MTPX_THREADS: LLM's count, also in server subprocesses;
# tests/test_threads.py covers the tuner that chooses it otherwise)
torch.set_num_threads(1)
os.environ["MTPX_THREADS"] = "1"
# without a GPU, the CUDA path's Triton kernels run in Triton's interpreter (read when triton is imported); static
# passes use them only where a test sets MTPX_TRITON_GDN=interpret
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import make_checkpoint  # noqa: E402


def pytest_sessionstart(session):
    """Where the kernels are required (CI: kernels.kernels_required()), a failed build fails the run here, with the
    compiler's output, instead of letting every test that needs them skip."""
    from mtpx import kernels
    if not kernels.kernels_required():
        return
    if os.environ.get("MTPX_ROWGEMM") == "0":
        pytest.exit("the CPU kernels are required here (MTPX_REQUIRE_KERNELS=1, or CI set), and MTPX_ROWGEMM=0 turns "
                    "them off: unset one of the two", returncode=1)
    try:
        kernels.rowgemm_module()
    except kernels.KernelBuildError as e:
        pytest.exit(str(e), returncode=1)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """Build each tiny checkpoint variant once per test session."""
    cache: dict = {}

    def get(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in cache:
            name = "-".join(f"{k}{v}" for k, v in key) or "default"
            cache[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt") / name, **kw)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def dense_ckpt(ckpt_factory):
    return ckpt_factory()


@pytest.fixture(scope="session")
def moe_ckpt(ckpt_factory):
    return ckpt_factory(moe=True)


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory):
    """Tiny checkpoints of the other families (tests/checkpoints.py make_{family}_checkpoint), once per session."""
    import checkpoints
    cache: dict = {}

    def get(family: str, **kw) -> Path:
        key = (family, *sorted(kw.items()))
        if key not in cache:
            name = "-".join([family] + [f"{k}{v}" for k, v in sorted(kw.items())])
            cache[key] = getattr(checkpoints, f"make_{family}_checkpoint")(tmp_path_factory.mktemp("ckpt") / name, **kw)
        return cache[key]
    return get


def pytest_unconfigure(config):
    """Triton's nanobind bindings print ~80 lines of "nanobind: leaked ... functions" when the interpreter exits
    (its module-level objects are still alive then; nothing the tests leak). pytest has printed its report by now;
    where Triton was imported, the interpreter's exit (after atexit handlers, after pytest restores stderr from its
    capture) writes nowhere."""
    if "triton" in sys.modules:
        import atexit

        def silence():
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        atexit.register(silence)
