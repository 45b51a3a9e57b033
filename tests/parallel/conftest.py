"""Models run over 2 CPU ranks (gloo): rank 0 is the test process, rank 1 a worker process it starts."""
import pytest
import torch

import mtpx


def parallel_llm(path, **kw):
    """An LLM over 2 ranks; its close() also puts back the test process's thread count (rank 0 runs on
    cores / ranks threads)."""
    threads = torch.get_num_threads()
    llm = mtpx.LLM(path, **kw)
    close = llm.close

    def close_and_restore():
        close()
        torch.set_num_threads(threads)
    llm.close = close_and_restore
    return llm


@pytest.fixture(scope="module", params=["tensor-dense", "tensor-moe", "layers-dense"])
def ranked(request, ckpt_factory):
    """(LLM over 2 ranks, the same model on one device)."""
    kind, variant = request.param.split("-")
    path = ckpt_factory(moe=variant == "moe")
    one = mtpx.LLM(path)
    llm = parallel_llm(path, **({"tensor_parallel": 2} if kind == "tensor" else {"split_layers": 2}))
    yield llm, one
    llm.close()
    assert all(p.returncode == 0 for p in llm.group.processes.values()), "a rank did not stop cleanly"
