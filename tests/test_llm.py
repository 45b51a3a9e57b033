"""Process-wide CPU settings of mtpx.llm."""
import torch

from mtpx.llm import tune_cpu_process


def test_tune_cpu_process_flushes_subnormals_only():
    tiny = torch.full((100_000,), 1e-30)  # large enough to be split across the intra-op threads
    tune_cpu_process()
    # 1e-40 is below the smallest normal fp32 (1.2e-38): zero once flushing is on; 1e-37 is normal and stays
    assert torch.count_nonzero(tiny * 1e-10) == 0
    assert torch.count_nonzero(tiny * 1e-7) == tiny.numel()
