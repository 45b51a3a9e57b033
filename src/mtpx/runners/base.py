"""The runner interface: how a loaded model's passes execute on one machine.

A runner is chosen once, when a model is loaded (runners.select_runner), and prepares each model it will run:
it converts weights to the layouts its kernels read and installs its implementations of some of the family's
methods on the model's modules (as vLLM's CustomOp picks a forward once). An installed method falls back to the
family's own (reference) method for the passes it does not handle, so the family file never checks a device or a
backend, and every fast path can be tested against the reference by loading the same checkpoint with the reference
runner.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from mtpx.loading.checkpoint import Checkpoint, build_model
from mtpx.state import SequenceState

if TYPE_CHECKING:
    from mtpx.runners.weights import Quantizer

# (module class, method name) -> implementation(module, fallback, *args): `fallback` is the method it replaces
# (the family's own, or an override installed before it), called with the same arguments for what it does not handle
Overrides = dict[tuple[type, str], Callable]


def install(model: nn.Module, overrides: Overrides) -> int:
    """Bind each override to every module of its class in `model`; returns how many were installed."""
    n = 0
    for module in model.modules():
        for (cls, name), impl in overrides.items():
            if type(module) is cls:
                module.__dict__[name] = functools.partial(impl, module, getattr(module, name))
                n += 1
    return n


class Runner:
    """The reference runner: the family's PyTorch code as written. Subclasses add fast paths."""
    name = "reference"
    static_steps = False  # whether sequences' main-stack states are StaticStates (runners/static.py)
    max_drafts: int | None = None  # the most drafts one verify pass may hold, where the runner bounds it

    def __init__(self, device: torch.device, dtype: torch.dtype, quantization: str | None = None):
        self.device, self.dtype, self.quantization = device, dtype, quantization

    @property
    def load_device(self) -> torch.device:
        """Where a checkpoint's tensors are loaded for prepare() (which may convert them and move them on)."""
        return self.device

    def check_memory(self, cfg, mtp_layers: int, kept: dict[str, str] | None = None) -> None:
        """Refuse a model that will not fit on the device, before its weights are read (runners/plan.py; kept:
        the GGUF types of weights loaded quantized as they are)."""

    def quantizer(self) -> Quantizer | None:
        """What quantizes this runner's weights as a checkpoint is read (runners/weights.py), where it has any."""
        return None

    def load(self, ckpt: Checkpoint, with_mtp: bool = True, shard: Callable | None = None,
             keep_quantized: bool = False) -> nn.Module:
        """The model of `ckpt` (loading/checkpoint.py build_model, on load_device), prepared. A whole model this
        runner quantizes is quantized as its weights are read; a sharded one (runners/distributed.py) once loaded."""
        quantizer = self.quantizer() if shard is None else None
        model = build_model(ckpt, self.dtype, self.load_device, with_mtp=with_mtp, shard=shard,
                            keep_quantized=keep_quantized, quantize_as_read=quantizer.as_read if quantizer else None)
        return self.prepare(model, quantizer)

    def prepare(self, model: nn.Module, quantizer: Quantizer | None = None) -> nn.Module:
        """Make `model` (just loaded, on self.device) run on this runner; returns it. `quantizer`: the one that
        quantized weights as they were read (load), to finish with."""
        return model

    def new_state(self, model: nn.Module, max_len: int) -> SequenceState:
        """Caches of a new sequence of the model's main stack."""
        return model.new_state(max_len)

    def release_state(self, state: SequenceState) -> None:
        """A sequence's caches are no longer needed (a runner may reuse them)."""

    def thread_tuner(self):
        """A ThreadTuner (mtpx.threads) choosing the CPU thread count of decode rounds, where the runner wants one."""
        return None

    @property
    def step_row_block(self) -> int | None:
        """Rows per weight read of step matmuls, where a runner's kernel reads weights once per block of rows (the
        draft policy's cost model); None where unknown."""
        return None

    def describe(self) -> str:
        return self.name
