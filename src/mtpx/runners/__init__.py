"""How a loaded model's passes execute, chosen once at load (`select_runner`):
- `reference` (runners/base.py): the family's PyTorch code as written;
- `cpu` (runners/cpu.py): bf16 / int8 / int4 weights in the C++ kernels' layouts, fused step kernels;
- `cuda` (runners/cuda.py): static step passes replayed as CUDA graphs, Triton recurrence, fused projections.
"""
from __future__ import annotations

import torch

from mtpx import kernels
from mtpx.config import ModelConfig
from mtpx.errors import RequestError
from mtpx.runners.weights import QUANTIZATIONS, STORED
from mtpx.runners.base import Runner
from mtpx.runners.config import RunnerConfig

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
QUANTIZED = set(QUANTIZATIONS)  # weight-only int8 (per output row) / int4 (groups of 32), bf16 activations


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError("device 'cuda' requested but no CUDA device is available")
    if not device.startswith(("cpu", "cuda")):
        raise RequestError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, stores_quantized: bool = False) -> tuple[torch.dtype, str | None]:
    """(activation / weight dtype, weight quantization or None) for a dtype name. None or "auto": bf16, except that
    a checkpoint which stores weights quantized (`stores_quantized`: a GGUF's blocks) keeps them as stored (STORED)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16, STORED if stores_quantized else None
    if isinstance(dtype, torch.dtype):
        return dtype, None
    if dtype in QUANTIZED:
        return torch.bfloat16, dtype
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}: use auto or one of {sorted(DTYPES) + sorted(QUANTIZED)}")
    return DTYPES[dtype], None


def select_runner(device: torch.device, dtype: torch.dtype, quantization: str | None, cfg: ModelConfig,
                  config: RunnerConfig | None = None) -> Runner:
    """The runner for this machine, model and request of dtype; `config` defaults to the environment's switches."""
    config = config or RunnerConfig.from_env()
    static = config.static_steps if config.static_steps is not None else (device.type == "cuda" and not cfg.is_moe)
    if device.type == "cuda" or static:
        from mtpx.runners.cuda import CudaRunner
        return CudaRunner(device, dtype, config, static, quantization)
    from mtpx.runners.cpu import CpuRunner  # the reference code plus the CPU's process settings where not bf16
    return CpuRunner(device, dtype, quantization, config, fused=dtype == torch.bfloat16 and kernels.rowgemm_available())


__all__ = ["Runner", "RunnerConfig", "select_runner", "resolve_device", "resolve_dtype", "DTYPES", "QUANTIZED",
           "STORED"]
